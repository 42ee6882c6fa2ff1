"""The engine is the released model: same token ids, same logits, same greedy tokens."""

import pytest
import torch

from RadFMSlicer.engine import RadFMEngine
from RadFMSlicer.tokenizer import EOS_ID


def test_tokenizer_matches_reference_on_every_case(engine, fixture_cases):
    for case in fixture_cases["tokenizer_cases"]:
        assert engine.tokenize(case["text"]) == list(case["input_ids"]), case["text"]


def test_image_tags_reproduce_reference_prompts(engine, fixture_cases):
    for case in fixture_cases["cases"]:
        text = case["question"]
        for k, pos in sorted(enumerate(case["positions"]), key=lambda kp: -kp[1]):
            text = text[:pos] + engine.image_tag(k) + text[pos:]
        assert text == case["text"]
        assert engine.tokenize(text) == case["input_ids"].tolist()


@pytest.mark.parametrize("index", range(3))
def test_prefill_logits_within_1e4(engine, fixture_cases, index):
    case = fixture_cases["cases"][index]
    logits = engine.logits(case["input_ids"].unsqueeze(0), case["vision_x"])
    assert logits.shape == (1, *case["prefill_logits"].shape)
    assert (logits[0] - case["prefill_logits"]).abs().max().item() < 1e-4


def _reference_tokens(case) -> list[int]:
    """The official output minus its leading bos=0, cut after the first real EOS."""
    ref = case["generated_ids"].tolist()[1:]
    return ref[: ref.index(EOS_ID) + 1] if EOS_ID in ref else ref


@pytest.mark.parametrize("index", range(3))
def test_greedy_tokens_identical(engine, fixture_cases, index):
    case = fixture_cases["cases"][index]
    expected = _reference_tokens(case)
    got = engine.generate_ids(case["input_ids"].unsqueeze(0), case["vision_x"], max_new_tokens=len(expected))
    assert got == expected


@pytest.mark.parametrize("index", range(3))
def test_greedy_tokens_identical_when_the_attention_map_was_asked_for(engine, fixture_cases, index):
    """``--attention`` and the panel's Show attention encode with the map; the answer is still the released one."""
    case = fixture_cases["cases"][index]
    with_map = RadFMEngine(engine.model, engine.tokenizer, engine.files)  # its own caches: the map's pass encodes
    for image in RadFMEngine.split_vision_x(case["vision_x"]):
        with_map.image_attention(image)
    expected = _reference_tokens(case)
    misses = with_map.cache.misses
    got = with_map.generate_ids(case["input_ids"].unsqueeze(0), case["vision_x"], max_new_tokens=len(expected))
    assert with_map.cache.misses == misses  # the answer used the tokens made with the map
    assert got == expected


def test_bfloat16_picks_the_same_first_token(fixture_dir, fixture_cases):
    bf16 = RadFMEngine.load(fixture_dir, dtype=torch.bfloat16)
    assert bf16.model.lang_model.lm_head.weight.dtype == torch.bfloat16
    for case in fixture_cases["cases"]:
        first = bf16.generate_ids(case["input_ids"].unsqueeze(0), case["vision_x"], max_new_tokens=1)
        assert first == [_reference_tokens(case)[0]], case["name"]


def test_compiled_static_cache_decode_gives_the_reference_tokens(fixture_dir, fixture_cases):
    """The opt-in GPU fast path (static KV cache + torch.compile) is still the released model."""
    compiled = RadFMEngine.load(fixture_dir, compile_decode=True)
    for case in fixture_cases["cases"]:
        expected = _reference_tokens(case)
        got = compiled.generate_ids(case["input_ids"].unsqueeze(0), case["vision_x"], max_new_tokens=len(expected))
        assert got == expected, case["name"]
