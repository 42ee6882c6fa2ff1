"""The real model's size on a GPU, random weights: time to first token, decode speed, VRAM per tier.

``python -m bench.gpu --device cuda`` builds RadFM at full size (LLaMA-13B: 40 layers of
5120, the full vision side) straight on the device, tier by tier, through the loader's
own path (``assign_weights`` with the quantizing hook, random tensors in place of the
file), then asks about a 64-slice volume through the engine:

* ``ttft_s``: from the question to the first token, the volume not yet encoded;
* ``followup_ttft_s``: the same for a follow-up about that volume (its encoding cached);
* ``decode_tok_s``: tokens per second after the first, against the bandwidth ceiling
  (every weight byte read once per token: ``bandwidth / weight bytes``);
* ``peak_vram_gib``: ``torch.cuda.max_memory_allocated`` over the load and the answer.

``--device cpu --layers 1 --small`` runs the same code at toy size (what the tests do).
"""

import argparse
import dataclasses
import gc
import json
import time

import numpy as np
import torch

from RadFMSlicer.checkpoint import assign_weights, build_llama_config, materialise_buffers
from RadFMSlicer.engine import RadFMEngine
from RadFMSlicer.generation import GenerationSettings
from RadFMSlicer.imaging import preprocess, volume_from_array
from RadFMSlicer.model import RadFMModel
from RadFMSlicer.quantization import QUANTIZED_DTYPES, LinearQuantizer, tier_dtype, weight_bytes
from RadFMSlicer.tokenizer import RadFMTokenizer

from .common import CT_GEOMETRY, MEDIUM_LLM, REAL_DIMS, TINY_VISION, engine_first_token_s, llama_config_dict, tokenizer_model

GIB = 2**30


class RandomWeights:
    """What ``assign_weights`` reads, with random tensors made on the device instead of a file."""

    def __init__(self, model: RadFMModel):
        self.shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}

    def load(self, key: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(self.shapes[key], device=device, dtype=dtype).normal_(0, 0.02)


def build(dims, tier: str, device: torch.device, compile_decode: bool) -> RadFMEngine:
    dtype = tier_dtype(tier)
    with torch.device("meta"):
        model = RadFMModel(dims, build_llama_config(llama_config_dict(dims), dims, "benchmark"))
    finish = LinearQuantizer(tier, device) if tier in QUANTIZED_DTYPES else None
    assign_weights(model, RandomWeights(model), device, dtype, finish)
    materialise_buffers(model, device)
    tokenizer = RadFMTokenizer(tokenizer_model())
    tokenizer.tokens_per_image = dims.num_latents
    return RadFMEngine(model.eval(), tokenizer, cache_size=1, quantization=finish and tier,
                       compile_decode=compile_decode)


def measure(engine: RadFMEngine, slices: int, new_tokens: int) -> dict:
    """A report about a CT-like volume, then a follow-up about it, as the worker asks them: the
    model image made on the engine's device and known by its fingerprint."""
    voxels = np.random.default_rng(0).integers(-1000, 1500, (slices, 512, 512), dtype=np.int16)
    image = preprocess(volume_from_array(voxels, CT_GEOMETRY, name="ct"), "soft_tissue", device=engine.device)
    prompt = engine.image_tag(0) + "Please write a radiology report for this scan."
    settings = GenerationSettings(max_new_tokens=new_tokens)
    engine.answer(prompt, [image], settings)  # warm-up (and compilation, when on)
    engine.cache.clear()
    sync(engine.device)
    start = time.perf_counter()
    generation = engine.stream(prompt, [image], settings)
    first = None
    for _ in generation:
        first = first or time.perf_counter() - start
    result = generation.result
    sync(engine.device)
    hits = engine.cache.hits
    follow_up = engine_first_token_s(engine, engine.image_tag(0) + "Is there a pleural effusion?", [image])
    return {"ttft_s": round(first, 3), "followup_ttft_s": round(follow_up, 4),
            "followup_encoding_cached": engine.cache.hits > hits,
            "decode_tok_s": round(result.tokens_per_s, 2), "new_tokens": len(result.token_ids)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiers", default="bfloat16,int8,int4", help="comma-separated precision tiers")
    parser.add_argument("--layers", type=int, default=REAL_DIMS.llm_layers, help="LLM layers (40 = RadFM)")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--bandwidth-gbs", type=float, default=3350, help="memory bandwidth, GB/s (H100 SXM: 3350)")
    parser.add_argument("--compile-decode", action="store_true")
    parser.add_argument("--small", action="store_true", help="toy widths, to check this script on a CPU")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    small = {**MEDIUM_LLM, **TINY_VISION} if args.small else {}
    dims = dataclasses.replace(REAL_DIMS, **{**small, "llm_layers": args.layers})
    for tier in args.tiers.split(","):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        engine = build(dims, tier, device, args.compile_decode)
        sync(device)
        line = {"what": "full_size_answer", "tier": tier, "device": str(device), "llm_layers": dims.llm_layers,
                "llm_dim": dims.llm_dim, "slices": args.slices, "compile_decode": args.compile_decode,
                "build_s": round(time.perf_counter() - start, 1)}
        line.update(measure(engine, args.slices, args.new_tokens))
        weights = weight_bytes(engine.model)
        line["weights_gib"] = round(weights / GIB, 2)
        line["ceiling_tok_s"] = round(args.bandwidth_gbs * 1e9 / weights, 1)
        if device.type == "cuda":
            line["peak_vram_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
        print(json.dumps(line), flush=True)
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
