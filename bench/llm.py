"""The language model: prefill at the real width (5120, 2 layers) and per-token decode per tier.

Prefill compares our path (SDPA attention, logits for the last position only, as
``Generation`` asks for) with transformers' eager attention and logits for every
position (what the official ``generate`` did). With 2 layers instead of 40 the
lm_head is a larger share than in the real model: its saving is shown on its own row.
Decode runs ``Generation`` (greedy, KV cache) on a medium LLM in each precision tier.
"""

import copy
import dataclasses
import gc
from functools import partial

import torch
from transformers import DynamicCache

from RadFMSlicer.generation import CompiledDecoder, DynamicDecoder, Generation, GenerationSettings
from RadFMSlicer.quantization import LinearQuantizer, weight_bytes
from RadFMSlicer.tokenizer import RadFMTokenizer

from .common import MEDIUM_LLM, REAL_DIMS, TINY_VISION, Result, compare, memory_fields, random_model, tokenizer_model


def prefill(recorder, quick: bool) -> None:
    dims = dataclasses.replace(REAL_DIMS, llm_layers=2, **TINY_VISION)
    lm32 = random_model(dims).lang_model
    lm16 = copy.deepcopy(lm32).to(torch.bfloat16)
    variants = {  # name: (model, attention, logits_to_keep)
        "off: eager attention, all logits, float32": (lm32, "eager", 0),
        "SDPA, all logits, float32": (lm32, "sdpa", 0),
        "ours: SDPA, last logits, float32": (lm32, "sdpa", 1),
        "ours: SDPA, last logits, bfloat16": (lm16, "sdpa", 1),
    }
    baseline = next(iter(variants))

    def forward(lm, attention, keep, embeds):
        lm.set_attn_implementation(attention)
        lm(inputs_embeds=embeds.to(lm.dtype), past_key_values=DynamicCache(), use_cache=True, logits_to_keep=keep)

    for length in (128,) if quick else (128, 512):
        embeds = torch.randn(1, length, dims.llm_dim) * 0.02
        measured = compare({name: partial(forward, *v, embeds) for name, v in variants.items()}, 2 if quick else 3)
        for name, (seconds, peak, extra) in measured.items():
            lm, attention, keep = variants[name]
            recorder.add(Result(
                "prefill", f"prefill {length} tokens, width 5120 x 2 layers", name,
                {"tokens": length, "hidden": dims.llm_dim, "layers": dims.llm_layers, "attention": attention,
                 "logits_to_keep": keep, "dtype": str(lm.dtype)[6:]},
                seconds, name == baseline, memory_fields(peak, extra),
            ))
    lm32.set_attn_implementation("sdpa")


def tier_model(model, tier: str):
    """A copy of ``model`` in ``tier``, quantized by the same hook the loader uses."""
    if tier == "float32":
        return model
    tiered = copy.deepcopy(model).to(torch.bfloat16)
    if tier != "bfloat16":
        quantizer = LinearQuantizer(tier, torch.device("cpu"))
        for name, module in list(tiered.named_modules()):
            quantizer(tiered, name, module)
    return tiered


def decode(recorder, quick: bool) -> None:
    dims = dataclasses.replace(REAL_DIMS, **MEDIUM_LLM, **TINY_VISION)
    base = random_model(dims)
    tokenizer = RadFMTokenizer(tokenizer_model())
    prompt = torch.randint(3, dims.vocab_size, (1, 64))
    new_tokens = 8 if quick else 24
    tiers = ["float32", "bfloat16", "int8", "int4"]
    try:
        import bitsandbytes  # noqa: F401

        tiers.append("nf4")
    except ImportError:
        print("# decode: nf4 left out (bitsandbytes not installed)")
    models = {tier: tier_model(base, tier) for tier in tiers}
    decoders = {tier: partial(DynamicDecoder, model.lang_model) for tier, model in models.items()}
    # the opt-in GPU path on the CPU: same float32 weights, static cache, compiled step (compiles in the warm-up)
    compiled = CompiledDecoder(base.lang_model, 2048)
    models["float32, static cache + compile"], decoders["float32, static cache + compile"] = base, lambda: compiled

    def per_token(model, make_decoder) -> float:
        """Seconds per generated token after the first (the first one pays for the prefill)."""
        generation = Generation(make_decoder(), tokenizer, prompt, model.embed(prompt, None),
                                GenerationSettings(max_new_tokens=new_tokens), 2048)
        result = generation.run()
        assert len(result.token_ids) > 1, "the random model stopped at once"
        return (result.total_s - result.time_to_first_token_s) / (len(result.token_ids) - 1)

    measured = compare({name: partial(per_token, models[name], decoders[name]) for name in models}, 2 if quick else 3)
    for name, (seconds, peak, _) in measured.items():
        weights = weight_bytes(models[name]) / 2**20
        recorder.add(Result(
            "decode", f"decode per token, width {dims.llm_dim} x {dims.llm_layers} layers", name,
            {"tier": name.split(",")[0], "compiled": name.endswith("compile"), "hidden": dims.llm_dim,
             "layers": dims.llm_layers, "prompt_tokens": prompt.shape[1], "new_tokens": new_tokens},
            seconds, name == "float32",
            {"weights_mb": round(weights), "tokens_per_s": round(1 / seconds, 2), "memory": f"weights {weights:.0f} MB"},
        ))


def run(recorder, quick: bool) -> None:
    prefill(recorder, quick)
    gc.collect()
    decode(recorder, quick)
