"""Per-token decode cost at batch 1 on tiny LLaMAs, where the arithmetic is nearly nothing.

What is left per token is overhead, and this benchmark says whose. Each tiny model (the
parity fixture, 2 layers of width 64; the same widths with 40 layers, as many as the
real model has) is decoded greedily three ways in the same run, rounds interleaved:

- ``transformers``: the bare ``LlamaForCausalLM`` forward with a ``DynamicCache`` and an
  argmax, in the shortest loop that decodes (the baseline);
- ``ours``: ``RadFMEngine.stream`` as the CLI, panel and server use it (the generation
  loop, cancellation checks, token picking, streamed text);
- ``floor``: the same layers' arithmetic as plain torch calls on the same weights (no
  modules, masks or cache objects; a preallocated KV cache), checked against the model.

Each runs with torch's intra-op threads as set (2 on this machine) and with 1: a tiny
op that opens a parallel region waits for every thread of it, which on a loaded machine
costs more than the op.
"""

import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from RadFMSlicer.engine import RadFMEngine
from RadFMSlicer.generation import GenerationSettings
from RadFMSlicer.testing import make_tiny_checkpoint

from .common import FIXTURE, Result, compare, tokenizer_model

PROMPT = "Please write a radiology report for this scan. Findings:"


class PlainLlama:
    """The floor: a LLaMA's decode arithmetic as plain torch calls on the model's own weights."""

    def __init__(self, lm, max_len: int):
        config = lm.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        model = lm.model
        self.embed, self.norm, self.head = model.embed_tokens.weight, model.norm.weight, lm.lm_head.weight
        self.layers = [
            (layer.input_layernorm.weight, layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
             layer.self_attn.v_proj.weight, layer.self_attn.o_proj.weight, layer.post_attention_layernorm.weight,
             layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight)
            for layer in model.layers
        ]
        positions = torch.arange(max_len).unsqueeze(0)
        cos, sin = model.rotary_emb(self.embed[:1].unsqueeze(0), positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        shape = (len(self.layers), self.kv_heads, max_len, self.head_dim)
        self.keys, self.values = torch.zeros(shape), torch.zeros(shape)

    def rms(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def rope(self, x, position):
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
        return x * self.cos[position] + rotated * self.sin[position]

    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits ``[V]`` after ``token`` at ``position`` (the cache holds the positions before)."""
        x = self.embed[token].unsqueeze(0)
        for i, (norm1, wq, wk, wv, wo, norm2, gate, up, down) in enumerate(self.layers):
            h = self.rms(x, norm1)
            q = self.rope(F.linear(h, wq).view(self.heads, 1, self.head_dim), position)
            self.keys[i, :, position] = self.rope(F.linear(h, wk).view(self.kv_heads, self.head_dim), position)
            self.values[i, :, position] = F.linear(h, wv).view(self.kv_heads, self.head_dim)
            attended = F.scaled_dot_product_attention(
                q, self.keys[i, :, :position + 1], self.values[i, :, :position + 1], enable_gqa=True)
            x = x + F.linear(attended.reshape(1, -1), wo)
            h = self.rms(x, norm2)
            x = x + F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)
        return F.linear(self.rms(x, self.norm), self.head)[0]


def ours(engine, new_tokens: int) -> tuple[float, list[int]]:
    result = engine.stream(PROMPT, [], GenerationSettings(max_new_tokens=new_tokens)).run()
    decode_s = result.total_s - result.time_to_first_token_s
    return decode_s / (len(result.token_ids) - 1), result.token_ids


def bare_transformers(engine, new_tokens: int) -> tuple[float, list[int]]:
    lm = engine.model.lang_model
    ids = torch.tensor([engine.tokenize(PROMPT)])
    cache = DynamicCache()
    logits = lm(inputs_embeds=engine.model.embed(ids, None), cache=cache, use_cache=True, logits_to_keep=1).logits
    tokens = [int(logits[0, -1].argmax())]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = lm(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True).logits
        tokens.append(int(logits[0, -1].argmax()))
    return (time.perf_counter() - start) / (new_tokens - 1), tokens


def floor(engine, new_tokens: int) -> tuple[float, list[int]]:
    ids = engine.tokenize(PROMPT)
    plain = PlainLlama(engine.model.lang_model, len(ids) + new_tokens)
    for position, token in enumerate(ids):
        logits = plain.step(token, position)
    tokens = [int(logits.argmax())]
    start = time.perf_counter()
    for position in range(len(ids), len(ids) + new_tokens - 1):
        tokens.append(int(plain.step(tokens[-1], position).argmax()))
    return (time.perf_counter() - start) / (new_tokens - 1), tokens


def timed(fn, engine, new_tokens, threads, seen) -> float:
    """Seconds per token of ``fn`` with ``threads`` intra-op threads; its tokens kept in ``seen``."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds, tokens = fn(engine, new_tokens)
    finally:
        torch.set_num_threads(before)
    seen[fn.__name__] = tokens
    return seconds


def run(recorder, quick: bool) -> None:
    new_tokens = 32 if quick else 128
    with tempfile.TemporaryDirectory() as tmp:
        forty = make_tiny_checkpoint(Path(tmp) / "tiny-40", tokenizer_model=tokenizer_model(), llm_layers=40)
        engines = {"parity fixture, width 64 x 2 layers": RadFMEngine.load(FIXTURE),
                   "tiny, width 64 x 40 layers": RadFMEngine.load(forty)}
    variants = {"transformers: bare forward + DynamicCache + argmax": bare_transformers,
                "ours: engine.stream (streamed text)": ours,
                "floor: the layers' arithmetic, plain torch": floor}
    for model, engine in engines.items():
        for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
            seen = {}
            calls = {name: partial(timed, fn, engine, new_tokens, threads, seen) for name, fn in variants.items()}
            measured = compare(calls, 2 if quick else 3)
            ours_tokens = seen["ours"]
            for name, tokens in seen.items():  # the same arithmetic: the same greedy tokens
                assert tokens[:len(ours_tokens)] == ours_tokens, f"{name} decoded other tokens than ours"
            for name, (seconds, _, _) in measured.items():
                recorder.add(Result(
                    "decode-overhead", f"decode batch 1 per token, {model}, {threads} thread(s)", name,
                    {"model": model, "threads": threads, "new_tokens": new_tokens},
                    seconds, name.startswith("transformers"),
                    {"tokens_per_s": round(1 / seconds, 1), "memory": f"{1 / seconds:.0f} tokens/s"},
                ))
