"""The perceiver resampler that turns any number of patch features into 32 image tokens.

Key names follow ``embedding_layer.perceiver.*`` of the released checkpoint (Flamingo-style:
latents attend to the concatenation of media features and themselves).
"""

import torch
import torch.nn.functional as F
from torch import nn


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, heads * dim_head * 2, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, need_weights: bool = False):
        """``[B, N, dim]`` media, ``[B, L, dim]`` latents -> ``[B, L, dim]`` (and the weights if asked).

        ``need_weights``: also return the latents' attention onto the media patches,
        ``[B, heads, L, N]`` (softmax over media and latents together, as in the forward
        pass; the latents' weights on themselves are left out). SDPA cannot return weights,
        so they are computed eagerly beside it, for the map alone: the output is SDPA's either
        way, so asking for the map changes no image token, and no answer.
        """
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        b, n_latents, _ = latents.shape
        q = self.to_q(latents).view(b, n_latents, self.heads, -1).transpose(1, 2)
        kv_input = torch.cat([media, latents], dim=1)
        k, v = self.to_kv(kv_input).view(b, kv_input.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n_latents, -1))
        if not need_weights:
            return out
        weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)  # [B, heads, L, N + L]
        return out, weights[..., : media.shape[1]]


def feed_forward(dim: int, inner_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner_dim, bias=False),
        nn.GELU(),
        nn.Linear(inner_dim, dim, bias=False),
    )


class PerceiverResampler(nn.Module):
    """``[B, N, dim]`` patch features -> ``[B, num_latents, dim]`` image tokens."""

    def __init__(self, *, dim: int, depth: int, heads: int, dim_head: int, num_latents: int, ff_dim: int):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), feed_forward(dim, ff_dim)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor, return_attention: bool = False):
        """Image tokens; with ``return_attention`` also ``[layers, B, N]``: per layer, the mean over
        heads and latents of the attention weight on each media patch, renormalised to sum to 1
        over the patches (where the 32 tokens drew from; computed in the same pass)."""
        latents = self.latents.expand(media.shape[0], -1, -1)
        maps = []
        for attn, ff in self.layers:
            if return_attention:
                delta, weights = attn(media, latents, need_weights=True)
                patch_weight = weights.float().mean(dim=(1, 2))  # [B, N]
                maps.append(patch_weight / patch_weight.sum(dim=-1, keepdim=True))
            else:
                delta = attn(media, latents)
            latents = delta + latents
            latents = ff(latents) + latents
        latents = self.norm(latents)
        return (latents, torch.stack(maps)) if return_attention else latents
