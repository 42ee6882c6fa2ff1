"""The benchmark scripts a researcher runs on a GPU work, checked here at toy size on the CPU."""

import json
from pathlib import Path

import pytest

from bench import gpu


def test_full_size_gpu_benchmark_runs_at_toy_size(capsys, fixture_dir):  # fixture_dir: the tokenizer it uses
    gpu.main(["--device", "cpu", "--tiers", "float32,int4", "--layers", "1", "--small", "--slices", "4",
              "--new-tokens", "4"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["tier"] for line in lines] == ["float32", "int4"]
    for line in lines:
        assert line["ttft_s"] > 0 and line["decode_tok_s"] > 0 and line["new_tokens"] >= 1
        assert line["followup_encoding_cached"] and line["followup_ttft_s"] > 0  # toy size: encoding costs ~nothing
    float32, int4 = lines
    assert int4["weights_gib"] < 0.5 * float32["weights_gib"]  # the quantizing hook ran while building
    assert int4["ceiling_tok_s"] > 2 * float32["ceiling_tok_s"]


def test_bench_overhead_leaves_nothing_in_the_temp_folder(monkeypatch, tmp_path, fixture_dir, capsys):
    """Its handed-over .npy volumes (up to 32 MB each) go when the run ends."""
    import tempfile

    from bench import followup
    from bench.common import Recorder

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    recorder = Recorder(tmp_path / "results" / "overhead.jsonl")
    followup.overhead(recorder, quick=True)
    assert [r.settings["slices"] for r in recorder.results] == [4, 4, 16, 16]
    assert list((tmp_path / "tmp").iterdir()) == []


def stopped_after_its_checkpoint(monkeypatch, tmp_path, name):
    """bench module ``name`` with the temp folder in ``tmp_path/tmp`` and a tiny checkpoint whose
    making ends in Ctrl-C, right after writing a file."""
    import importlib
    import tempfile

    module = importlib.import_module(f"bench.{name}")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))

    def checkpoint_then_stop(folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "pytorch_model.bin").write_bytes(b"0" * 1024)
        raise KeyboardInterrupt  # the researcher pressed Ctrl-C

    monkeypatch.setattr(module, "make_tiny_checkpoint", checkpoint_then_stop)
    monkeypatch.setattr(module, "tokenizer_model", lambda: None, raising=False)
    return module


@pytest.mark.parametrize("topic, args", [("viewer", (True,)), ("evaluation", (2, 1)), ("decode_overhead", (True,))])
def test_a_bench_run_that_stops_part_way_removes_its_checkpoint_and_scans(monkeypatch, tmp_path, topic, args):
    """bench viewer writes a checkpoint and three 150 MB scans, bench evaluation a checkpoint and run
    folders, in a temp folder of their own: removed however the run ends."""
    from bench.common import Recorder

    module = stopped_after_its_checkpoint(monkeypatch, tmp_path, topic)
    with pytest.raises(KeyboardInterrupt):
        module.run(Recorder(tmp_path / "results" / f"{topic}.jsonl"), *args)
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("script", ["worker_latency", "server_load"])
def test_the_standalone_bench_scripts_remove_the_checkpoint_they_make(monkeypatch, tmp_path, script):
    """Run without --checkpoint they make a tiny one in a temp folder of their own, removed however they end."""
    import sys

    module = stopped_after_its_checkpoint(monkeypatch, tmp_path, script)
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(KeyboardInterrupt):
        module.main()
    assert list((tmp_path / "tmp").iterdir()) == []
