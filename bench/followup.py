"""A follow-up question on an encoded volume vs a cold ask, through the engine.

Real vision width, a 64-slice volume (16 in --quick), a small LLM so that the vision
encoder's share is visible; float32 as the engine runs on the CPU by default. "Cache
off" is the engine with an encoding cache of size 0: it re-encodes for every question,
as the official code does.
"""

import dataclasses
import time
from functools import partial

import torch

from RadFMSlicer.engine import RadFMEngine
from RadFMSlicer.generation import GenerationSettings
from RadFMSlicer.tokenizer import RadFMTokenizer

from .common import REAL_DIMS, Result, compare, memory_fields, random_model, tokenizer_model

SMALL_LLM = dict(llm_dim=1024, llm_layers=4, llm_intermediate=2816)


def run(recorder, quick: bool) -> None:
    dims = dataclasses.replace(REAL_DIMS, **SMALL_LLM)
    model = random_model(dims)
    tokenizer = RadFMTokenizer(tokenizer_model())
    tokenizer.tokens_per_image = dims.num_latents
    slices, new_tokens = (16, 4) if quick else (64, 8)
    volume = torch.rand(3, 512, 512, slices)
    engines = {"off: cache off (re-encode)": RadFMEngine(model, tokenizer, cache_size=0),
               "ours: encoding cache": RadFMEngine(model, tokenizer, cache_size=8)}
    encodes = dict.fromkeys(engines, 0)
    real_encode = model.encode_images

    def follow_up(name: str) -> float:
        """Time to the first token of a second question about the volume, and count the encoder calls."""
        def counting(images):
            encodes[name] += 1
            return real_encode(images)

        model.encode_images = counting
        start = time.perf_counter()
        generation = engines[name].stream(engines[name].image_tag(0) + "Is there a pleural effusion?", [volume],
                                          GenerationSettings(max_new_tokens=new_tokens))
        result = generation.run()
        del model.encode_images
        return time.perf_counter() - start - result.total_s + result.time_to_first_token_s

    for engine in engines.values():  # the first question about the volume
        engine.answer(engine.image_tag(0) + "Please write a radiology report for this scan.", [volume],
                      GenerationSettings(max_new_tokens=new_tokens))
    repeats = 2
    measured = compare({name: partial(follow_up, name) for name in engines}, repeats, warmup=False)
    for name, (seconds, peak, extra) in measured.items():
        recorder.add(Result(
            "follow_up", f"follow-up question, {slices}-slice volume: time to first token", name,
            {"slices": slices, "new_tokens": new_tokens, "cache_size": engines[name].cache.capacity,
             "dtype": "float32", "llm": f"{dims.llm_dim} x {dims.llm_layers} layers", "vision": "768 x 12 layers"},
            seconds, name == next(iter(engines)),
            {**memory_fields(peak, extra), "vision_encodes_per_question": encodes[name] / repeats,
             "memory": f"{encodes[name] / repeats:g} vision encode(s) per question"},
        ))
