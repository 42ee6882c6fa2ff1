"""Published benchmark files (RadFM's test files, CT-RATE's reports) and RadFM's .npy volumes."""

import json

import numpy as np
import pydicom.data
import pytest

from RadFMSlicer.evaluation.datasets import load_manifest

CT = pydicom.data.get_testdata_file("CT_small.dcm")


def radfm_npy(path, images=1, shape=(20, 16, 5)):
    """A volume as RadFM's loaders save them: [n, 3, H, W, D], each image's gray repeated on 3 channels."""
    rng = np.random.default_rng(len(str(path)))
    gray = rng.uniform(0, 255, (images, 1, *shape)).astype(np.float32)
    np.save(path, np.repeat(gray, 3, axis=1))
    return gray[:, 0]


def test_a_radfm_npy_reads_slices_on_its_last_axis_and_names_each_of_several_images(tmp_path):
    from RadFMSlicer.imaging import load_volume
    from RadFMSlicer.errors import ImageError

    gray = radfm_npy(tmp_path / "two.npy", images=2)
    volume = load_volume(f"{tmp_path / 'two.npy'}#1")
    assert volume.shape == (5, 20, 16)  # D slices of H x W
    assert np.array_equal(volume.voxels[2], gray[1][:, :, 2])  # slice 2 of image #1, rows and columns kept
    with pytest.raises(ImageError, match=r"holds 2 images .* pick one as .*two.npy#0 \.\.\. .*two.npy#1"):
        load_volume(tmp_path / "two.npy")
    with pytest.raises(ImageError, match="#2 is not one of them"):
        load_volume(f"{tmp_path / 'two.npy'}#2")
    np.save(tmp_path / "odd.npy", np.zeros((2, 2, 2, 2, 2, 2)))
    with pytest.raises(ImageError, match=r"RadFM's .npy volumes are \[n, 3, H, W, D\]"):
        load_volume(tmp_path / "odd.npy")
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(ImageError, match="Cannot read .*text.npy as a NumPy array"):
        load_volume(tmp_path / "text.npy")


def write_csv(path, header, *rows):
    path.write_text("\n".join([",".join(header), *(",".join(r) for r in rows)]) + "\n")
    return path


def test_radfm_test_csvs_are_read_as_they_ship_in_file_order_with_one_fixed_question(tmp_path):
    radfm_npy(tmp_path / "a.npy")
    radfm_npy(tmp_path / "b.npy", images=3)
    yes_no = load_manifest(write_csv(tmp_path / "yn.csv", ["image_path", "disease", "label"],
                                     ["a.npy", "pneumonia", "1"], ["b.npy", "fracture", "0"]))
    assert [(c.id, c.task, c.question, c.reference) for c in yes_no] == [
        ("2", "diagnosis", "pneumonia", "yes"), ("3", "diagnosis", "fracture", "no")]
    assert yes_no[1].images == [f"{tmp_path / 'b.npy'}#{k}" for k in range(3)]  # all three images, none dropped
    (diagnosis,) = load_manifest(write_csv(tmp_path / "dx.csv", ["image_path", "label"], ["a.npy", "atelectasis"]))
    assert (diagnosis.task, diagnosis.question, diagnosis.reference) == (
        "vqa", "What is the diagnosis for this image?", "atelectasis")
    (vqa3d,) = load_manifest(write_csv(tmp_path / "v3.csv", ["image_path", "question", "answer"],
                                       ["a.npy", "Where is the lesion?", "left lobe"]))
    assert (vqa3d.task, vqa3d.question, vqa3d.reference) == ("vqa", "Where is the lesion?", "left lobe")
    (vqa,) = load_manifest(write_csv(tmp_path / "vqarad.csv", ["img_root_dir", "Figure_path", "Question", "Answer"],
                                     [str(tmp_path), "a.npy", "Is there a mass?", "no"]))
    assert vqa.images == [str(tmp_path / "a.npy")] and vqa.extra["benchmark"] == "radfm-vqa"
    again = load_manifest(tmp_path / "yn.csv")
    assert [c.to_dict() for c in again] == [c.to_dict() for c in yes_no]  # deterministic: nothing drawn at random


def test_modality_yes_no_questions_ask_the_true_and_another_modality(tmp_path, capsys):
    from RadFMSlicer.cli import main

    radfm_npy(tmp_path / "a.npy")
    write_csv(tmp_path / "modality.csv", ["image_path", "answer"], ["/cluster/data/a.npy", "CT"],
              ["/cluster/data/a.npy", "MRI"])
    (tmp_path / "modality_set.json").write_text(json.dumps({"modality": ["CT", "MRI", "X-ray", "PET"]}))
    out = tmp_path / "m.jsonl"
    assert main(["eval", "import", str(tmp_path / "modality.csv"), "--out", str(out), "--modality-set",
                 str(tmp_path / "modality_set.json"), "--rebase", f"/cluster/data/={tmp_path}/"]) == 0
    assert "radfm-modality, 6 case(s)" in capsys.readouterr().err
    cases = {c.id: c for c in load_manifest(out)}
    assert list(cases) == ["2", "2-yes", "2-no", "3", "3-yes", "3-no"]
    assert cases["2"].task == "modality" and cases["2"].images == [str(tmp_path / "a.npy")]
    for line, truth in (("2", "CT"), ("3", "MRI")):
        yes, no = cases[f"{line}-yes"], cases[f"{line}-no"]
        assert (yes.question, yes.reference) == (f"Was this image taken with {truth}?", "yes")
        assert no.reference == "no" and no.extra["asked"] != truth and no.extra["asked"] in no.question


def test_caption_rationale_json_and_ct_rate_reports(tmp_path):
    radfm_npy(tmp_path / "a.npy")
    (tmp_path / "article.json").write_text(json.dumps([{
        "npy_path": "a.npy", "finding": "Enhancing mass.", "impression": "Glioma.", "title": "Glioblastoma",
        "radiographic_features": ["Ring enhancement.", "Oedema."], "pre": "Headache.", "pat": "54 year old man."}]))
    report, rationale = load_manifest(tmp_path / "article.json")
    assert (report.id, report.task, report.reference) == ("1-report", "report", "Findings: Enhancing mass. Impression: Glioma.")
    assert report.question.startswith("54 year old man. Headache. Please write a radiology report")
    assert (rationale.task, rationale.reference) == ("rationale", "Ring enhancement. Oedema.")
    assert rationale.extra["title"] == "Glioblastoma"
    nested = tmp_path / "volumes" / "valid_1" / "valid_1_a"
    nested.mkdir(parents=True)
    (nested / "valid_1_a_1.nii.gz").write_bytes(b"")
    write_csv(tmp_path / "reports.csv", ["VolumeName", "Findings_EN", "Impressions_EN"],
              ["valid_1_a_1.nii.gz", "No nodules.", "Normal chest CT."])
    from RadFMSlicer.evaluation.imports import benchmark_rows

    (row,), fmt = benchmark_rows(tmp_path / "reports.csv", images_dir=tmp_path / "volumes")
    assert fmt == "ct-rate" and row["images"] == [str(nested / "valid_1_a_1.nii.gz")]
    assert row["reference"] == "Findings: No nodules. Impression: Normal chest CT."


def test_import_names_an_unknown_file_missing_images_and_empty_references(tmp_path, capsys):
    from RadFMSlicer.cli import main

    write_csv(tmp_path / "other.csv", ["path", "text"], ["a", "b"])
    assert main(["eval", "import", str(tmp_path / "other.csv"), "--out", str(tmp_path / "m.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "not a known benchmark file (found columns: path, text" in err and "radfm-yes-no: image_path" in err
    write_csv(tmp_path / "reports.csv", ["VolumeName", "Findings_EN", "Impressions_EN"],
              ["valid_1_a_1.nii.gz", "", ""])
    assert main(["eval", "import", str(tmp_path / "reports.csv"), "--out", str(tmp_path / "m.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "line 1: empty reference, image not found" in err and "--rebase OLD=NEW or --images DIR" in err
    assert main(["eval", "import", str(tmp_path / "reports.csv"), "--out", str(tmp_path / "m.jsonl"),
                 "--rebase", "nothing"]) == 2
    assert "--rebase needs OLD=NEW" in capsys.readouterr().err
    (tmp_path / "latin1.csv").write_bytes("image_path,label\nr\xf6ntgen.npy,normal\n".encode("latin-1"))
    assert main(["eval", "import", str(tmp_path / "latin1.csv"), "--out", str(tmp_path / "m.jsonl")]) == 2
    assert "latin1.csv line 2 is not UTF-8 text (byte 0xf6 at column 2; Latin-1 or a Windows code page?): save it " \
           "as UTF-8" in capsys.readouterr().err  # as a manifest is told
    (tmp_path / "twice.csv").write_text("image_path,label,label\nct.npy,normal,pneumonia\n")
    assert main(["eval", "import", str(tmp_path / "twice.csv"), "--out", str(tmp_path / "m.jsonl")]) == 2
    assert "twice.csv line 1: the column 'label' appears twice (columns 2 and 3)" in capsys.readouterr().err


def test_a_manifest_that_cannot_be_written_is_one_line_and_no_cut_file(tmp_path, capsys, monkeypatch):
    """--out a folder, under a file, or on a full disk: one line each (a traceback before), nothing half-written."""
    import errno
    import os

    from RadFMSlicer import storage
    from RadFMSlicer.cli import main

    np.save(tmp_path / "ct.npy", np.zeros((3, 8, 8, 4), np.float32))
    write_csv(tmp_path / "diagnosis.csv", ["image_path", "label"], ["ct.npy", "normal"])
    for out, said in [(tmp_path, f"output {tmp_path} is a folder: give a file"),
                      (tmp_path / "diagnosis.csv" / "m.jsonl", f"{tmp_path / 'diagnosis.csv'} is a file; give a folder")]:
        assert main(["eval", "import", str(tmp_path / "diagnosis.csv"), "--out", str(out)]) == 2
        assert said in capsys.readouterr().err

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.os, "fsync", disk_full)
    assert main(["eval", "import", str(tmp_path / "diagnosis.csv"), "--out", str(tmp_path / "m.jsonl")]) == 2
    assert "No space left on device, " in capsys.readouterr().err
    assert not (tmp_path / "m.jsonl").exists() and not list(tmp_path.glob(storage.UNFINISHED))


def test_a_json_lines_manifest_named_json_is_still_a_manifest(tmp_path):
    (tmp_path / "cases.json").write_text(json.dumps({"images": [CT], "task": "modality", "reference": "CT"}) + "\n")
    (case,) = load_manifest(tmp_path / "cases.json")
    assert case.task == "modality" and case.images == [CT]


def test_a_benchmark_run_records_a_broken_volume_instead_of_dropping_it(tiny_engine, tmp_path):
    from RadFMSlicer.evaluation.run import run_eval
    from RadFMSlicer.evaluation.records import read_cases
    from RadFMSlicer.generation import GenerationSettings

    radfm_npy(tmp_path / "good.npy", images=2)
    np.save(tmp_path / "broken.npy", np.zeros((2, 2, 2, 2, 2, 2)))
    manifest = write_csv(tmp_path / "vqa3d.csv", ["image_path", "question", "answer"],
                         ["good.npy", "Is there a mass?", "yes"], ["broken.npy", "Is there a mass?", "no"])
    summary = run_eval(tiny_engine, load_manifest(manifest), tmp_path / "run", GenerationSettings(max_new_tokens=2),
                       progress=False)
    records = {r["id"]: r for r in read_cases(tmp_path / "run")}
    assert summary["cases"]["failed"] == 1 and "RadFM's .npy volumes are" in records["3"]["error"]
    assert [s["source"] for s in records["2"]["seen"]] == [f"{tmp_path / 'good.npy'}#{k}" for k in range(2)]
