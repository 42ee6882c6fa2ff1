"""Vision encoding (3D ViT + perceiver + projection) at the real width: SDPA vs the official maths.

The baseline swaps our attention modules for classes that compute attention the way
the released RadFM code does (``dots = q @ k^T * scale; softmax; @ v``, and the
perceiver's max-subtracted ``einsum`` softmax), with the same weights.
"""

import copy
import dataclasses
from functools import partial

import torch

from RadFMSlicer.model.resampler import PerceiverAttention
from RadFMSlicer.model.vision import SelfAttention

from .common import REAL_DIMS, Result, compare, memory_fields, random_model


class MathSelfAttention(SelfAttention):
    """The official ViT attention: the full ``[heads, n, n]`` score matrix in memory."""

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        dots = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        out = torch.matmul(dots.softmax(dim=-1), v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class MathPerceiverAttention(PerceiverAttention):
    """The official (Flamingo) perceiver attention."""

    def forward(self, media, latents):
        media, latents = self.norm_media(media), self.norm_latents(latents)
        b, n_latents, _ = latents.shape
        kv_input = torch.cat([media, latents], dim=1)
        q = self.to_q(latents).view(b, n_latents, self.heads, -1).transpose(1, 2) * (self.to_q.out_features // self.heads) ** -0.5
        k, v = self.to_kv(kv_input).view(b, kv_input.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        sim = torch.einsum("bhid,bhjd->bhij", q, k)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)
        return self.to_out(out.transpose(1, 2).reshape(b, n_latents, -1))


def with_math_attention(model):
    """A copy of ``model`` whose attention runs the official maths (same weights)."""
    baseline = copy.deepcopy(model)
    for module in baseline.modules():
        if type(module) is SelfAttention:
            module.__class__ = MathSelfAttention
        elif type(module) is PerceiverAttention:
            module.__class__ = MathPerceiverAttention
    return baseline


def run(recorder, quick: bool) -> None:
    # Real vision side; a one-layer narrow LLM (unused here) keeps the model small.
    dims = dataclasses.replace(REAL_DIMS, llm_dim=512, llm_layers=1, llm_intermediate=1024)
    ours = random_model(dims)
    variants = {  # name: (model, dtype)
        "off: math attention, float32": (with_math_attention(ours), torch.float32),
        "ours: SDPA, float32": (ours, torch.float32),
        "off: math attention, bfloat16": (with_math_attention(ours).to(torch.bfloat16), torch.bfloat16),
        "ours: SDPA, bfloat16": (copy.deepcopy(ours).to(torch.bfloat16), torch.bfloat16),
    }
    baseline = next(iter(variants))
    torch.manual_seed(0)
    for slices in (4, 16) if quick else (4, 16, 64):
        volume = torch.rand(1, 3, 512, 512, slices)
        calls = {name: partial(model.encode_images, volume.to(dtype)) for name, (model, dtype) in variants.items()}
        big = slices == 64  # 20 s a call for the baseline: the smaller sizes have warmed up the kernels
        measured = compare(calls, repeats=2 if big or quick else 3, warmup=not big)
        for name, (seconds, peak, extra) in measured.items():
            recorder.add(Result(
                "vision_encode", f"vision {slices} slices", name,
                {"slices": slices, "tokens": 16 * 16 * slices // 4, "width": dims.vision_dim,
                 "layers": dims.vision_layers, "dtype": str(variants[name][1])[6:]},
                seconds, name == baseline, memory_fields(peak, extra),
            ))
