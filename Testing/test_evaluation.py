"""Evaluation: manifests, scores checked against the libraries themselves, runs, comparisons, gallery."""

import csv
import json
from pathlib import Path

import nibabel
import pydicom.data
import pytest

from RadFMSlicer.evaluation.datasets import ManifestError, load_manifest

CT = pydicom.data.get_testdata_file("CT_small.dcm")
MR = pydicom.data.get_testdata_file("MR_small.dcm")
NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"
ANATOMICAL = str(NIBABEL_DATA / "anatomical.nii")
STANDARD = str(NIBABEL_DATA / "standard.nii.gz")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- manifest ----------------------------------------------------------------------------
def test_jsonl_manifest_resolves_paths_keeps_extra_columns_and_numbers_ids(tmp_path):
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "a.nii").write_bytes(b"")
    (tmp_path / "mask.nii.gz").write_bytes(b"")
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "ct1", "images": [CT], "task": "modality", "reference": "CT", "site": "A"},
        "",
        {"images": ["scans/a.nii", CT], "task": "diagnosis", "question": "pleural effusion", "reference": "no",
         "region": "mask.nii.gz:2", "box": [0, 0, 0, 10, 10, 10], "finding": "effusion"},
    ])
    first, second = load_manifest(manifest)
    assert first.id == "ct1" and first.extra == {"site": "A"} and first.images == [CT]
    assert second.id == "3" and second.images == [str(tmp_path / "scans" / "a.nii"), CT]
    assert second.region_mask == (str(tmp_path / "mask.nii.gz"), 2) and second.box == [0, 0, 0, 10, 10, 10]
    assert second.extra == {"finding": "effusion"}


def test_csv_manifest_splits_images_on_semicolons(tmp_path):
    with open(tmp_path / "m.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "images", "task", "question", "reference", "box", "site"])
        writer.writerow(["two", f"{ANATOMICAL};{STANDARD}", "vqa", "What changed", "nothing", "1,2,3,4,5,6", "B"])
    (case,) = load_manifest(tmp_path / "m.csv")
    assert case.images == [ANATOMICAL, STANDARD] and case.question == "What changed"
    assert case.box == [1, 2, 3, 4, 5, 6] and case.extra == {"site": "B"}


def test_every_bad_row_is_named_in_one_error(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"images": [CT], "task": "modality", "reference": "CT"},
        {"images": ["missing.nii.gz"], "task": "modality", "reference": "CT"},
        {"images": [CT], "task": "segment", "reference": "CT"},
        {"images": [CT], "task": "report", "reference": "  "},
        {"images": [CT], "task": "vqa", "reference": "yes"},
        "{not json",
        {"images": [CT], "task": "report", "reference": "x", "box": [1, 2]},
        {"id": "1", "images": [CT], "task": "report", "reference": "x"},
    ])
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    message = str(info.value)
    assert "\n" not in message and "7 bad row(s)" in message
    assert f"line 2: image not found: {tmp_path / 'missing.nii.gz'}" in message
    assert "line 3: unknown task 'segment'" in message
    assert "line 4: empty reference" in message
    assert "line 5: task vqa needs 'question'" in message
    assert "line 6: not JSON" in message
    assert "line 7: 'box' needs six numbers" in message
    assert "line 8: id '1' repeats line 1" in message


def test_csv_without_images_column_and_missing_manifest_are_clear(tmp_path):
    (tmp_path / "m.csv").write_text("image,task,reference\na.nii,report,x\n")
    with pytest.raises(ManifestError, match="needs a header row with an 'images' column"):
        load_manifest(tmp_path / "m.csv")
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "none.jsonl")


# --- metrics -----------------------------------------------------------------------------
PAIRS = [
    ("No acute abnormality. The lungs are clear.", "The lungs are clear. No acute abnormality."),
    ("There is a small left pleural effusion.", "Small left pleural effusions are present."),
    ("Cardiomegaly.", "The heart size is normal."),
]


def test_open_text_scores_are_the_libraries_own_values():
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    from RadFMSlicer.evaluation.metrics import score_case

    bleu = BLEU(effective_order=True, lowercase=True)
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for answer, reference in PAIRS:
        scores = score_case("report", answer, reference)
        assert scores["bleu"] == pytest.approx(bleu.sentence_score(answer, [reference]).score)
        assert scores["rougeL"] == pytest.approx(rouge.score(reference, answer)["rougeL"].fmeasure)
    same = score_case("rationale", "Pneumonia with consolidation.", "pneumonia with consolidation.")
    assert same["bleu"] == pytest.approx(100.0) and same["rougeL"] == pytest.approx(1.0)
    # "effusion" and "effusions" share a stem: ROUGE-L counts them as the same word
    assert score_case("report", "left effusion", "left effusions")["rougeL"] == pytest.approx(1.0)


@pytest.mark.parametrize("task, answer, reference, correct", [
    ("diagnosis", "Yes, there is a small effusion.", "yes", True),
    ("diagnosis", "No.", "Yes", False),
    ("diagnosis", "Possibly.", "no", False),  # unrecognised counts wrong
    ("vqa", "not seen", "No", True),
    ("modality", "This is a computed tomography scan of the chest.", "CT", True),
    ("modality", "The image is an MR scan, T2-weighted.", "MRI", True),
    ("modality", "A CT image, not an MRI.", "MRI", False),  # the earliest mention decides
    ("modality", "Chest radiograph.", "x-ray", True),
    ("modality", "nuclear medicine", "Nuclear medicine!", True),  # unknown labels compare as plain text
])
def test_closed_answers_are_scored_after_the_documented_normalisation(task, answer, reference, correct):
    from RadFMSlicer.evaluation.metrics import score_case

    scores = score_case(task, answer, reference)
    assert set(scores) >= {"accuracy"} and "bleu" not in scores
    assert scores["accuracy"] == float(correct)


def test_bootstrap_interval_brackets_the_mean_narrows_with_cases_and_reproduces():
    import numpy as np

    from RadFMSlicer.evaluation.metrics import bootstrap_ci

    rng = np.random.default_rng(1)
    few, many = rng.random(10), rng.random(1000)
    low, high = bootstrap_ci(few)
    assert low < few.mean() < high and bootstrap_ci(few) == [low, high]
    assert np.diff(bootstrap_ci(many))[0] < (high - low) / 4
    assert bootstrap_ci([0.5] * 7) == [0.5, 0.5]


def test_breakdown_per_task_and_extra_column_and_records_how_scores_were_made():
    from RadFMSlicer.evaluation.metrics import breakdown, provenance

    cases = [
        {"task": "modality", "scores": {"accuracy": 1.0}, "extra": {"site": "A"}},
        {"task": "modality", "scores": {"accuracy": 0.0}, "extra": {"site": "B"}},
        {"task": "report", "scores": {"bleu": 20.0, "rougeL": 0.5}, "extra": {"site": "A"}},
    ]
    result = breakdown(cases)
    assert result["overall"]["accuracy"]["mean"] == 0.5 and result["overall"]["accuracy"]["n"] == 2
    assert result["by_task"]["report"]["bleu"]["mean"] == 20.0
    assert result["by_column"]["site"]["A"]["accuracy"]["mean"] == 1.0
    assert result["by_column"]["site"]["B"]["accuracy"]["ci95"] == [0.0, 0.0]
    info = provenance()
    assert set(info["libraries"]) == {"sacrebleu", "rouge-score", "numpy"}
    assert "tok:13a" in info["bleu_signature"] and "first word decides" in info["normalisation"]["yes/no"]
