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
