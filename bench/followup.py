"""Follow-up questions: what a second question about an encoded scan costs.

``run``: time to the first token at real widths (vision 768 x 12 layers, LLM 5120 x 1
layer), float32, a 64-slice volume (16 in --quick), against the official code's cold
prefill in the same run (its matmul-softmax vision attention, eager LLM attention, logits
for every position, the image encoded for every question): our cold first question and
our follow-up (the image's tokens come from the encoding cache).

``overhead``: a follow-up's overhead, everything but the LLM forward (the request as the
worker gets it, a handed-over int16 ``.npy``, to the prompt's embeddings), at 4, 16 and 64
slices, against today's path replicated in :mod:`bench.today` (re-read, re-preprocess,
re-hash and re-check every question).
"""

import contextlib
import dataclasses
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from RadFMSlicer.ask import AskRequest, ImageInput, start
from RadFMSlicer.engine import RadFMEngine
from RadFMSlicer.generation import GenerationSettings
from RadFMSlicer.image_cache import NO_CACHE, ImageCache
from RadFMSlicer.imaging import preprocess, volume_from_array
from RadFMSlicer.model.resampler import PerceiverAttention
from RadFMSlicer.model.vision import SelfAttention
from RadFMSlicer.tokenizer import RadFMTokenizer

from .common import (CT_GEOMETRY, REAL_DIMS, TINY_VISION, Result, compare, engine_first_token_s, memory_fields,
                     random_model, tokenizer_model)
from .today import today_path
from .vision import MathPerceiverAttention, MathSelfAttention

ONE_LAYER_LLM = dict(llm_layers=1)
QUESTION = "Is there a pleural effusion?"


def engine_for(dims) -> RadFMEngine:
    tokenizer = RadFMTokenizer(tokenizer_model())
    tokenizer.tokens_per_image = dims.num_latents
    return RadFMEngine(random_model(dims), tokenizer, cache_size=8)


def ct_volume(slices: int, seed: int = 0):
    """A 512 x 512 int16 CT-like volume as the viewer holds it, and its model image."""
    array = np.random.default_rng(seed).integers(-1000, 1500, (slices, 512, 512)).astype(np.int16)
    return array, preprocess(volume_from_array(array, CT_GEOMETRY, name="ct"), "soft_tissue")


@contextlib.contextmanager
def official_attention(model):
    """The official maths in place (same weights): vision attention classes swapped, LLM eager."""
    swapped = [(m, type(m)) for m in model.modules() if type(m) in (SelfAttention, PerceiverAttention)]
    for module, cls in swapped:
        module.__class__ = MathSelfAttention if cls is SelfAttention else MathPerceiverAttention
    model.lang_model.set_attn_implementation("eager")
    try:
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls
        model.lang_model.set_attn_implementation("sdpa")


def run(recorder, quick: bool) -> None:
    dims = dataclasses.replace(REAL_DIMS, **ONE_LAYER_LLM)
    engine = engine_for(dims)
    model = engine.model
    slices = 16 if quick else 64
    _, image = ct_volume(slices)
    prompt = engine.image_tag(0) + QUESTION
    ids = torch.tensor([engine.tokenize(prompt)])
    vision_x = image.tensor.contiguous()[None]  # the official code's input: 3 real channels

    def official_cold():
        """The released code: encode the image, then a forward over the whole prompt, all logits."""
        with official_attention(model):
            tokens = model.encode_images(vision_x)[0]
            model.lang_model(inputs_embeds=model.embed(ids, tokens), past_key_values=DynamicCache(), use_cache=True)

    def ours(cold: bool) -> float:
        """From the question to its first token (encode if cold, embed, prefill)."""
        if cold:
            engine.cache.clear()
        return engine_first_token_s(engine, prompt, [image])

    engine.answer(prompt, [image], GenerationSettings(max_new_tokens=1))  # warm: kernels, and the image encoded
    calls = {"official code: cold (encode + prefill)": official_cold,
             "ours: cold (encode + prefill)": partial(ours, True),
             "ours: follow-up (encoding cached)": partial(ours, False)}
    measured = compare(calls, repeats=2, warmup=False)
    for name, (seconds, peak, extra) in measured.items():
        recorder.add(Result(
            "follow_up", f"time to first token, {slices}-slice volume, real widths, LLM 1 layer, float32", name,
            {"slices": slices, "dtype": "float32", "llm": f"{dims.llm_dim} x {dims.llm_layers} layer",
             "vision": f"{dims.vision_dim} x {dims.vision_layers} layers", "prompt_tokens": ids.shape[1]},
            seconds, name.startswith("official"), memory_fields(peak, extra),
        ))


def overhead(recorder, quick: bool) -> None:
    dims = dataclasses.replace(REAL_DIMS, llm_dim=256, llm_layers=1, llm_intermediate=512, **TINY_VISION)
    engine = engine_for(dims)
    with tempfile.TemporaryDirectory(prefix="radfm-bench-") as folder:  # the handed-over .npy files, up to 32 MB
        for slices in (4, 16) if quick else (4, 16, 64):
            _overhead(recorder, quick, engine, Path(folder), slices)


def _overhead(recorder, quick: bool, engine: RadFMEngine, folder: Path, slices: int) -> None:
    """One volume size of :func:`overhead`, its ``.npy`` saved in ``folder``."""
    array, _ = ct_volume(slices)
    np.save(folder / f"ct-{slices}.npy", array)
    handed_over = {"array": str(folder / f"ct-{slices}.npy"), "ijk_to_ras": CT_GEOMETRY.tolist(), "name": "ct",
                   "window": "40,400"}
    kept = ImageCache()

    def follow_up(today: bool) -> None:
        """The worker's path from an ask line to the prompt's embeddings (no LLM forward)."""
        with today_path(today):
            request = AskRequest(question=QUESTION, images=[ImageInput.from_json(handed_over)])
            start(engine, request, None, NO_CACHE if today else kept)

    for today in (True, False):  # the first question: encoded once per path (their keys differ)
        follow_up(today)
    measured = compare({"today: re-read, re-preprocess, re-hash": partial(follow_up, True),
                        "ours: known by fingerprint": partial(follow_up, False)}, repeats=3 if quick else 5)
    for name, (seconds, peak, extra) in measured.items():
        recorder.add(Result(
            "follow_up_overhead", f"follow-up overhead without the LLM forward, {slices} slices", name,
            {"slices": slices, "volume": f"512x512x{slices} int16 .npy", "window": "40,400"},
            seconds, name.startswith("today"), memory_fields(peak, extra),
        ))
