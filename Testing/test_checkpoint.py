"""Loading: every broken checkpoint gets an error naming the problem; good ones load lean."""

import json
import shutil

import pytest
import torch

from RadFMSlicer.checkpoint import locate_checkpoint
from RadFMSlicer.engine import RadFMEngine
from RadFMSlicer.errors import CheckpointError, RadFMError
from RadFMSlicer.testing import train_demo_tokenizer


@pytest.fixture
def editable_copy(tmp_path, fixture_dir):
    """A writable copy of the fixture checkpoint (weights symlinked until a test rewrites them)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(fixture_dir / "Language_files", folder / "Language_files")
    (folder / "pytorch_model.bin").symlink_to(fixture_dir / "pytorch_model.bin")
    return folder


def rewrite_state(folder, change):
    state = dict(torch.load(folder / "pytorch_model.bin", weights_only=True))
    change(state)
    (folder / "pytorch_model.bin").unlink()
    torch.save(state, folder / "pytorch_model.bin")


def load_error(folder, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        RadFMEngine.load(folder, **kwargs)
    return str(info.value)


def test_missing_folder(tmp_path):
    assert "checkpoint folder not found" in load_error(tmp_path / "nope")


def test_the_weights_file_given_for_the_folder_names_the_folder(fixture_dir):
    message = load_error(fixture_dir / "pytorch_model.bin")
    assert message == (f"the checkpoint {fixture_dir / 'pytorch_model.bin'} is a file: give the folder that holds it "
                       f"({fixture_dir}, with pytorch_model.bin and Language_files/)")


def test_folder_without_weights(tmp_path):
    (tmp_path / "Language_files").mkdir()
    assert "pytorch_model.bin" in load_error(tmp_path)


def test_missing_language_files(editable_copy):
    shutil.rmtree(editable_copy / "Language_files")
    assert "Language_files" in load_error(editable_copy)


def test_tokenizer_folder_without_tokenizer_model(editable_copy):
    (editable_copy / "Language_files" / "tokenizer.model").unlink()
    assert "no tokenizer.model" in load_error(editable_copy)


def test_wrong_tokenizer_is_named(editable_copy):
    train_demo_tokenizer(editable_copy / "Language_files" / "tokenizer.model")
    message = load_error(editable_copy)
    assert "wrong tokenizer folder" in message and "32000" in message


def test_corrupt_tokenizer_model(editable_copy):
    (editable_copy / "Language_files" / "tokenizer.model").write_bytes(b"not a model")
    assert "not a sentencepiece tokenizer" in load_error(editable_copy)


def test_truncated_weights(editable_copy, fixture_dir):
    data = (fixture_dir / "pytorch_model.bin").read_bytes()
    (editable_copy / "pytorch_model.bin").unlink()
    (editable_copy / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    assert "not a readable PyTorch checkpoint" in load_error(editable_copy)


def test_a_corrupt_weights_file_gives_our_sentence_and_pytorchs_cause_in_brief(editable_copy, fixture_dir):
    (editable_copy / "pytorch_model.bin").unlink()
    (editable_copy / "pytorch_model.bin").write_bytes((fixture_dir / "pytorch_model.bin").read_bytes()[:300_000])
    message = load_error(editable_copy)
    assert message.endswith("is not a readable PyTorch checkpoint — truncated download or a different file? "
                            "(PytorchStreamReader failed reading zip archive: failed finding central directory)")
    assert "miniz" not in message and len(message) - len(str(editable_copy)) < 200, message
    assert "pytorch_model.bin (0.3 MB) is not" in message  # the size a cut download has, not "0.00 GB"


def test_non_torch_file(editable_copy):
    (editable_copy / "pytorch_model.bin").unlink()
    (editable_copy / "pytorch_model.bin").write_text("<html>404 Not Found</html>")
    assert "not a readable PyTorch checkpoint" in load_error(editable_copy)


def test_missing_key_is_named(editable_copy):
    rewrite_state(editable_copy, lambda s: s.pop("embedding_layer.perceiver.layers.1.0.to_q.weight"))
    assert "embedding_layer.perceiver.layers.1.0.to_q.weight" in load_error(editable_copy)


def test_unexpected_key_is_named(editable_copy):
    rewrite_state(editable_copy, lambda s: s.update({"embedding_layer.extra_head.weight": torch.zeros(2)}))
    assert "embedding_layer.extra_head.weight" in load_error(editable_copy)


def test_wrong_shape_is_named(editable_copy):
    def shrink(state):
        state["lang_model.model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)

    rewrite_state(editable_copy, shrink)
    message = load_error(editable_copy)
    assert "lang_model.model.layers.1.mlp.up_proj.weight" in message and "[100, 64]" in message


def test_config_disagreeing_with_weights(editable_copy):
    path = editable_copy / "Language_files" / "config.json"
    config = json.loads(path.read_text())
    config["hidden_size"] = 5120
    path.write_text(json.dumps(config))
    assert "hidden_size=5120" in load_error(editable_copy)


def test_training_only_keys_are_ignored_and_embedding_shared(fixture_dir, engine):
    shapes = torch.load(fixture_dir / "pytorch_model.bin", mmap=True, weights_only=True)
    assert any(k.startswith("embedding_layer.bert_model.") for k in shapes)
    names = {n for n, _ in engine.model.named_parameters()}
    assert not any("bert" in n or "cls_head" in n or "transformer_decoder" in n for n in names)
    assert torch.equal(engine.model.lang_model.get_input_embeddings().weight, shapes["embedding_layer.weight"])


def test_no_meta_tensor_survives_loading(engine):
    assert not any(t.is_meta for t in [*engine.model.parameters(), *engine.model.buffers()])


@pytest.mark.parametrize("device, message", [("cuda:7", "cuda"), ("mps", "unsupported device"), ("bogus!", "unknown device")])
def test_bad_device(fixture_dir, device, message):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.fail("test assumes fewer than 8 GPUs")
    assert message in load_error(fixture_dir, device=device)


def test_bad_dtype(fixture_dir):
    assert "unknown dtype" in load_error(fixture_dir, dtype="float8")


def test_locate_reports_layout(fixture_dir):
    files = locate_checkpoint(fixture_dir)
    assert files.layout == "official" and len(files.fingerprint()) == 16


def test_an_answer_names_the_weights_that_were_loaded_and_reads_no_checkpoint_bytes(tiny_checkpoint, tmp_path,
                                                                                    monkeypatch):
    """Provenance was the folder's fingerprint at answer time: 2 MiB read per file per answer, and after the
    folder's weights were replaced under a running model, the answer claimed weights it was not made with."""
    from pydicom.data import get_testdata_file

    from RadFMSlicer.ask import AskRequest, ImageInput, ask
    from RadFMSlicer.generation import GenerationSettings

    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    engine = RadFMEngine.load(folder)
    loaded = locate_checkpoint(folder).fingerprint()
    config = locate_checkpoint(folder).config
    config.write_text(config.read_text() + " ")  # the folder changes under the running model
    assert locate_checkpoint(folder).fingerprint() != loaded
    reads = []
    opened = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: reads.append(str(path)) or opened(path, *a, **k))
    turn = ask(engine, AskRequest(question="Effusion?", images=[ImageInput(path=get_testdata_file("CT_small.dcm"))],
                                  settings=GenerationSettings(max_new_tokens=1)))
    assert turn.provenance["model"]["checkpoint_fingerprint"] == loaded
    assert not [path for path in reads if path.startswith(str(folder))]


def test_gpu_out_of_memory_while_loading_says_what_to_do(fixture_dir, monkeypatch):
    import RadFMSlicer.engine

    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 250.00 MiB")

    monkeypatch.setattr(RadFMSlicer.engine, "load_model", exhausted)
    with pytest.raises(RadFMError, match="GPU out of memory while loading .*use a lower precision"):
        RadFMEngine.load(fixture_dir)
