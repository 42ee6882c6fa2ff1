"""radfm convert: sharded safetensors that load to the same model, with a checkable manifest."""

import json

import pytest
import torch
from safetensors import safe_open

from RadFMSlicer.checkpoint import SAFETENSORS_INDEX, is_inference_key
from RadFMSlicer.cli import main as radfm
from RadFMSlicer.convert import MANIFEST, convert_checkpoint, sha256_file
from RadFMSlicer.engine import RadFMEngine
from RadFMSlicer.errors import CheckpointError


@pytest.fixture(scope="module")
def converted(tmp_path_factory, fixture_dir):
    """The fixture in bfloat16, in shards of ~8 MB so that there are several."""
    return convert_checkpoint(fixture_dir, tmp_path_factory.mktemp("conv") / "radfm-bf16", shard_size_gb=0.008)


def test_layout_index_and_manifest(converted, fixture_dir):
    index = json.loads((converted / SAFETENSORS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    official = torch.load(fixture_dir / "pytorch_model.bin", mmap=True, weights_only=True)
    assert set(index["weight_map"]) == {k for k in official if is_inference_key(k)}
    assert "embedding_layer.weight" not in index["weight_map"]
    assert not any("bert_model" in k or "inv_freq" in k for k in index["weight_map"])
    with safe_open(str(converted / shards[0]), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16

    manifest = json.loads((converted / MANIFEST).read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["source"]["layout"] == "official"
    on_disk = {p.relative_to(converted).as_posix() for p in converted.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    assert "Language_files/tokenizer.model" in on_disk
    for name, entry in manifest["files"].items():
        assert sha256_file(converted / name) == entry["sha256"], name


def test_same_weights_as_the_official_file(converted, fixture_dir, fixture_cases):
    """bfloat16 from either layout is bit-identical; float32 from bf16 shards is within bf16 rounding."""
    case = fixture_cases["cases"][1]
    ids, vision = case["input_ids"].unsqueeze(0), case["vision_x"]
    official = RadFMEngine.load(fixture_dir, dtype="bfloat16")
    ours = RadFMEngine.load(converted, dtype="bfloat16")
    assert ours.files.layout == "safetensors"
    assert torch.equal(official.logits(ids, vision), ours.logits(ids, vision))

    upcast = RadFMEngine.load(converted).logits(ids, vision)[0]
    assert torch.nn.functional.cosine_similarity(upcast, case["prefill_logits"], dim=-1).min() > 0.999
    assert upcast[-1].argmax() == case["prefill_logits"][-1].argmax()  # the first greedy token


def test_refuses_a_non_empty_output_folder(tmp_path, fixture_dir):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        convert_checkpoint(fixture_dir, tmp_path)


def test_command_line_converts_and_the_result_answers(tmp_path, fixture_dir, capsys):
    out = tmp_path / "fp32"
    assert radfm(["convert", "--checkpoint", str(fixture_dir), "--out", str(out), "--dtype", "float32"]) == 0
    assert "model-00001-of-00001.safetensors" in capsys.readouterr().err
    assert json.loads((out / MANIFEST).read_text())["dtype"] == "float32"
    # a second run into the same folder is refused without touching it
    assert radfm(["convert", "--checkpoint", str(fixture_dir), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_a_missing_or_truncated_shard_is_named(tmp_path, converted):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    shard = sorted(copy.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{shard.name} is not a readable safetensors file"):
        RadFMEngine.load(copy)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name} named in model.safetensors.index.json is missing"):
        RadFMEngine.load(copy)
