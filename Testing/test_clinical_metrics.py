"""Clinical metrics through radeval, the table of metric scales, the paired randomization test.

The radeval tests need ``RadFMSlicer[metrics]`` (not in the ``test`` extra: README, Evaluate a run);
no metric model's weights reach this machine, so the one model-based path tested runs radeval's
BERTScore on a tiny random DistilBERT that the test writes into a Hugging Face cache of its own:
its scores are noise, and only show that the scores of such a model reach the records, summary
and gallery.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom.data
import pytest

CT = pydicom.data.get_testdata_file("CT_small.dcm")
PAIRS = [
    ("No acute abnormality. The lungs are clear.", "The lungs are clear. No acute abnormality."),
    ("There is a small left pleural effusion.", "Small left pleural effusions are present."),
    ("Cardiomegaly.", "The heart size is normal."),
]


def test_the_cli_table_shows_each_metric_on_the_scale_of_the_metric_table():
    from RadFMSlicer.evaluation.metrics import METRICS, breakdown, score_case
    from RadFMSlicer.evaluation.run import format_table

    cases = [{"task": "report", "scores": score_case("report", answer, reference)} for answer, reference in PAIRS]
    cases.append({"task": "modality", "scores": score_case("modality", "CT", "CT")})
    summary = {"metrics": breakdown(cases), "cases": {"answered": 4, "failed": 0, "not_run": 0}}
    text = format_table(summary)
    rouge = summary["metrics"]["overall"]["rougeL"]["mean"]
    assert 1 < rouge <= 100 and f"{rouge:.1f} [" in text and "ROUGE-L " in text  # F1 x 100, as BLEU's 0-100
    assert METRICS["bertscore"].on_scale(0.5) == 50 and METRICS["radcliq_v1"].on_scale(0.5) == 0.5
    assert "accuracy %" in text and "100.0 [100.0, 100.0]" in text  # the one modality case, right


def test_unknown_metric_or_missing_radeval_is_one_line_before_the_model_loads(capsys, tmp_path, tiny_checkpoint,
                                                                               monkeypatch):
    from RadFMSlicer.cli import main

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"images": [CT], "task": "report", "reference": "Normal."}) + "\n")
    argv = ["eval", "--checkpoint", str(tiny_checkpoint), "--manifest", str(manifest), "--out", str(tmp_path / "r")]
    assert main(argv + ["--metrics", "radgraph,chexpert"]) == 2
    err = capsys.readouterr().err
    assert "unknown metric(s) chexpert for --metrics; choose from bertscore, radgraph" in err and "Loading" not in err
    monkeypatch.setitem(sys.modules, "radeval", None)  # as where RadFMSlicer[metrics] is not installed
    assert main(argv + ["--metrics", "radgraph"]) == 2
    err = capsys.readouterr().err
    assert "--metrics needs radeval: pip install 'RadFMSlicer[metrics]'" in err and "Loading" not in err


def test_a_chest_x_ray_metric_on_ct_volumes_is_named_in_the_summary():
    from RadFMSlicer.evaluation.metrics import domain_notes

    volume = {"scores": {"rougeL": 0.5, "radgraph_partial": 0.4, "ratescore": 0.6}, "seen": [{"shape": [3, 512, 512, 8]}]}
    (note,) = domain_notes([volume])
    assert note.startswith("RadGraph F1 partial comes from a model trained on chest X-ray reports")
    picture = volume | {"seen": [{"shape": [3, 512, 512, 1]}]}  # a 2D image: a radiograph, say
    assert domain_notes([picture]) == []


def test_randomization_p_value_matches_exact_enumeration_of_swaps():
    from RadFMSlicer.evaluation.compare import randomization_p

    deltas = np.array([0.5, 0.2, 0.1, -0.05, 0.3])
    flips = np.array(list(itertools.product((-1, 1), repeat=deltas.size)))
    exact = np.mean(np.abs((flips * deltas).mean(axis=1)) >= abs(deltas.mean()) - 1e-12)  # 4 of 32
    assert randomization_p(deltas) == pytest.approx(exact, abs=0.01)
    assert randomization_p(np.zeros(20)) == 1.0  # no change at all: nothing to explain
    assert randomization_p(np.ones(40)) < 0.001  # every case better


def test_compare_prints_a_p_value_beside_each_paired_interval(capsys, tmp_path):
    from RadFMSlicer.cli import main
    from RadFMSlicer.evaluation.metrics import score_case

    for name, answers in (("a", ["CT", "CT", "MRI", "CT"]), ("b", ["CT", "CT", "CT", "CT"])):
        (tmp_path / name).mkdir()
        records = [{"id": str(k), "task": "modality", "reference": "CT", "answer": answer,
                    "scores": score_case("modality", answer, "CT")} for k, answer in enumerate(answers)]
        (tmp_path / name / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("accuracy %")]
    assert "75.0" in row and "100.0" in row and "+25.0 [+0.0, +75.0]" in row and "1.0000" in row  # one case of four
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["metrics"]["accuracy"]["p"] == 1.0


# --- through radeval ----------------------------------------------------------------------
def radeval_or_skip():
    """radeval, where RadFMSlicer[metrics] is installed. The README's test command runs without it (it is no
    part of the test extra) and says why each test is skipped; CI's metrics step installs it and sets
    RADFM_METRICS_LANE=1, where its absence fails instead."""
    try:
        import radeval
    except ImportError:
        if os.environ.get("RADFM_METRICS_LANE") == "1":
            pytest.fail("radeval is not installed in the metrics lane: pip install 'RadFMSlicer[metrics]'", pytrace=False)
        pytest.skip("radeval not installed: pip install 'RadFMSlicer[metrics]'")
    return radeval


def test_radeval_rouge_l_agrees_with_our_own_per_case_scores():
    radeval = radeval_or_skip()
    from RadFMSlicer.evaluation.metrics import score_case

    references, answers = [r for _, r in PAIRS], [a for a, _ in PAIRS]
    theirs = radeval.RadEval(metrics=["rouge"], per_sample=True, show_progress=False)(references, answers)
    ours = [score_case("report", a, r)["rougeL"] for a, r in PAIRS]
    assert [100 * v for v in theirs["rougeL"]] == pytest.approx(ours, abs=1e-10)  # ours: F1 x 100, one scale
    # radeval's BLEU is another definition (pycocoevalcap, 0-1, unsmoothed) than our sacrebleu sentence BLEU:
    # the table keeps ours under "bleu", and --metrics offers none of radeval's weight-free scores


def tiny_distilbert_cache(home: Path) -> None:
    """A random 5-layer DistilBERT (radeval's BERTScore reads layer 5) with a 40-word vocabulary, stored as
    the Hugging Face cache stores distilbert-base-uncased, so radeval loads it offline by that name."""
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizer

    words = sorted({w.strip(".,").lower() for a, r in PAIRS for w in (a + " " + r).split()})
    snapshot = home / "hub" / "models--distilbert-base-uncased" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + words) + "\n")
    (home / "hub" / "models--distilbert-base-uncased" / "refs").mkdir()
    (home / "hub" / "models--distilbert-base-uncased" / "refs" / "main").write_text("0" * 40)
    DistilBertTokenizer(str(snapshot / "vocab.txt"), model_max_length=128).save_pretrained(snapshot)
    config = DistilBertConfig(vocab_size=len(words) + 7, dim=32, hidden_dim=64, n_layers=5, n_heads=2,
                              max_position_embeddings=128)
    DistilBertModel(config).save_pretrained(snapshot)


def test_a_model_based_metric_scores_every_report_and_a_missing_one_is_named(tmp_path, tiny_checkpoint):
    radeval_or_skip()
    tiny_distilbert_cache(tmp_path / "hf")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"r{k}", "images": [CT], "task": "report", "reference": r}) + "\n"
                                for k, (_, r) in enumerate(PAIRS))
                        + json.dumps({"id": "m", "images": [CT], "task": "modality", "reference": "CT"}) + "\n")
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-m", "RadFMSlicer.cli", "eval", "--checkpoint", str(tiny_checkpoint),
                           "--manifest", str(manifest), "--out", str(tmp_path / "run"), "--max-new-tokens", "4",
                           "--metrics", "bertscore,radgraph"], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (missing,) = [line for line in done.stderr.splitlines() if "not scored" in line]
    assert missing.startswith("radfm: radgraph not scored: its model could not be loaded") and "StanfordAIMI/RRG_scorers" in missing
    records = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "run" / "cases.jsonl").read_text().splitlines()}
    # a random model's BERTScore is noise: what is checked is that every report has one, the modality case none
    assert all(isinstance(records[f"r{k}"]["scores"]["bertscore"], float) for k in range(3))
    assert "bertscore" not in records["m"]["scores"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["overall"]["bertscore"]["n"] == 3 and len(summary["metrics"]["overall"]["bertscore"]["ci95"]) == 2
    assert summary["scoring"]["clinical"]["metrics"] == ["bertscore"] and "radgraph" in summary["scoring"]["clinical"]["unavailable"]
    assert "BERTScore" in done.stdout
    page = (tmp_path / "run" / "index.html").read_text()
    assert '"metric_keys": ["accuracy", "bleu", "rougeL", "bertscore"]' in page
