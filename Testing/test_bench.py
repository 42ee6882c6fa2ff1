"""The benchmark scripts a researcher runs on a GPU work, checked here at toy size on the CPU."""

import json

from bench import gpu


def test_full_size_gpu_benchmark_runs_at_toy_size(capsys, fixture_dir):  # fixture_dir: the tokenizer it uses
    gpu.main(["--device", "cpu", "--tiers", "float32,int4", "--layers", "1", "--small", "--slices", "4",
              "--new-tokens", "4"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["tier"] for line in lines] == ["float32", "int4"]
    for line in lines:
        assert line["ttft_s"] > 0 and line["decode_tok_s"] > 0 and line["new_tokens"] >= 1
    float32, int4 = lines
    assert int4["weights_gib"] < 0.5 * float32["weights_gib"]  # the quantizing hook ran while building
    assert int4["ceiling_tok_s"] > 2 * float32["ceiling_tok_s"]
