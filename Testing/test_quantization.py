"""Precision tiers on the fixture against float32, their memory, and the VRAM check.

Thresholds: weight-only quantization adds a relative weight error of about 0.5% (int8,
per-row scales over 255 steps) or about 8% (4-bit, 15 steps per group), which leaves
the logits' cosine similarity near 1 - err^2/2 per layer: about 0.99999 and 0.997. The
thresholds (0.9995 and 0.99) leave room for the layers compounding, while a wrong
packing or scale (the failures worth catching) gives a cosine far below 0.9.
"""

import sys

import pytest
import torch

from RadFMSlicer.engine import RadFMEngine
from RadFMSlicer.errors import CheckpointError
from RadFMSlicer.quantization import (
    QUANTIZED_PREFIX, check_device_memory, estimate_memory, estimate_weight_bytes, weight_bytes,
)

MIN_COSINE = {"bfloat16": 0.9995, "int8": 0.9995, "int4": 0.99, "nf4": 0.99}
MAX_LINEAR_SHARE = {"int8": 0.55, "int4": 0.3, "nf4": 0.35}  # of the bfloat16 bytes


def load(fixture_dir, tier):
    if tier == "bfloat16":
        return RadFMEngine.load(fixture_dir, dtype="bfloat16")
    return RadFMEngine.load(fixture_dir, quantization=tier)


def linear_weight_bytes(engine) -> int:
    return sum(weight_bytes(m) for name, m in engine.model.named_modules()
               if name.startswith(QUANTIZED_PREFIX) and name.rsplit(".", 1)[-1].endswith("proj"))


@pytest.fixture(scope="module")
def bf16_engine(fixture_dir):
    return load(fixture_dir, "bfloat16")


@pytest.mark.parametrize("tier", ["bfloat16", "int8", "int4", "nf4"])
def test_tier_against_float32(tier, fixture_dir, fixture_cases, engine, bf16_engine):
    quantized = load(fixture_dir, tier)
    assert quantized.quantization == (None if tier == "bfloat16" else tier)
    assert quantized.dtype == torch.bfloat16
    assert quantized.model.embedding_layer.vision_encoder.to_patch_embedding[2].weight.dtype == torch.bfloat16
    for case in fixture_cases["cases"]:
        ids, vision = case["input_ids"].unsqueeze(0), case["vision_x"]
        reference = engine.logits(ids, vision)[0, -1]
        got = quantized.logits(ids, vision)[0, -1]
        assert torch.nn.functional.cosine_similarity(reference, got, dim=0) > MIN_COSINE[tier], case["name"]
        assert got.argmax() == reference.argmax(), case["name"]  # the first greedy token
    if tier != "bfloat16":
        assert linear_weight_bytes(quantized) < MAX_LINEAR_SHARE[tier] * linear_weight_bytes(bf16_engine)
        assert quantized.model.lang_model.lm_head.weight.dtype == torch.bfloat16  # kept 16-bit on purpose
    # the estimate behind the VRAM check and the README table is the measured size
    assert weight_bytes(quantized.model) == pytest.approx(estimate_weight_bytes(quantized.model.dims, tier), rel=0.01)


def test_nf4_without_bitsandbytes_says_what_to_install(fixture_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(CheckpointError, match="pip install bitsandbytes"):
        load(fixture_dir, "nf4")


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantization="int3"), "unknown quantization"),
    (dict(quantization="int8", dtype="float32"), "bfloat16 or float16 activations"),
    (dict(quantization="int4", dtype="float16"), "bfloat16 activations"),
])
def test_bad_combinations_are_refused(fixture_dir, kwargs, message):
    with pytest.raises(CheckpointError, match=message):
        RadFMEngine.load(fixture_dir, **kwargs)


def test_vram_check_names_the_tiers_that_fit(engine, monkeypatch):
    dims = engine.model.dims
    free = estimate_memory(dims, "int8") + 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    check_device_memory(dims, torch.device("cuda"), "int4")  # fits: no error
    with pytest.raises(CheckpointError) as info:
        check_device_memory(dims, torch.device("cuda"), "float32")
    message = str(info.value)
    assert "int8" in message and "int4" in message and "float32 (" not in message
