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
        {"images": [CT], "task": "diagnosis", "question": "effusion", "reference": "maybe"},
    ])
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    message = str(info.value)
    assert "\n" not in message and "8 bad row(s)" in message
    assert f"line 2: image not found: {tmp_path / 'missing.nii.gz'}" in message
    assert "line 3: unknown task 'segment'" in message
    assert "line 4: empty reference" in message
    assert "line 5: task vqa needs 'question'" in message
    assert "line 6: not JSON" in message
    assert "line 7: 'box' needs six numbers" in message
    assert "line 8: id '1' repeats line 1" in message
    assert "line 9: a diagnosis reference must say yes or no, got 'maybe'" in message


def test_a_repeated_id_is_named_beside_the_other_errors_of_its_row(capsys, tmp_path, tiny_checkpoint):
    from RadFMSlicer.cli import main

    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "c1", "images": [CT], "task": "modality", "reference": "CT"},
        {"id": "c1", "images": [CT], "task": "segment", "reference": ""},
        {"id": "c2", "images": [CT], "task": "segment", "reference": "CT"},
        {"id": "c2", "images": [CT], "task": "modality", "reference": "CT"},
    ])
    code = main(["eval", "--checkpoint", str(tiny_checkpoint), "--manifest", str(manifest),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "3 bad row(s)" in err and "Loading" not in err
    assert "line 2: id 'c1' repeats line 1, unknown task 'segment'" in err and "empty reference" in err
    assert "line 4: id 'c2' repeats line 3" in err  # a bad row's id is taken as well


def test_csv_without_images_column_and_missing_manifest_are_clear(tmp_path):
    (tmp_path / "m.csv").write_text("image,task,reference\na.nii,report,x\n")
    with pytest.raises(ManifestError, match="needs a header row with an 'images' column"):
        load_manifest(tmp_path / "m.csv")
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "none.jsonl")


def test_manifests_read_alike_whatever_wrote_them(tmp_path):
    """A byte-order mark is accepted in JSON lines as in CSV; a Latin-1 file, a column named twice and a line
    nested past the parser are one line each naming the file, the line and what is wrong."""
    from RadFMSlicer.errors import RadFMError

    row = {"images": [CT], "task": "modality", "reference": "CT"}
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\n")
    (tmp_path / "bom.csv").write_bytes(f"\ufeffimages,task,reference\n{CT},modality,CT\n".encode())
    assert [c.reference for c in load_manifest(tmp_path / "bom.jsonl") + load_manifest(tmp_path / "bom.csv")] == [
        "CT", "CT"]

    (tmp_path / "latin1.csv").write_bytes(f"images,task,reference\n{CT},report,\xc9panchement\n".encode("latin-1"))
    with pytest.raises(RadFMError, match=r"latin1.csv line 2 is not UTF-8 text \(byte 0xc9 at column "
                                         rf"{len(CT) + 9};.*save it as UTF-8"):
        load_manifest(tmp_path / "latin1.csv")
    (tmp_path / "twice.csv").write_text(f"images,reference,task,reference\n{CT},CT,modality,MR\n")
    with pytest.raises(RadFMError, match=r"twice.csv line 1: the column 'reference' appears twice \(columns 2 and 4\)"):
        load_manifest(tmp_path / "twice.csv")
    write_jsonl(tmp_path / "deep.jsonl", [row, "[" * 100_000 + "]" * 100_000,
                                          {**row, "task": "vqa", "question": "Is <image> clear?"}])
    with pytest.raises(ManifestError, match=r"deep.jsonl: 2 bad row\(s\).*line 2: JSON nested too deeply.*"
                                            r"line 3: 'question' contains '<image>'"):
        load_manifest(tmp_path / "deep.jsonl")
    (tmp_path / "long.csv").write_text(f"images,task,reference\n{CT},modality,CT,extra\n")
    with pytest.raises(ManifestError, match="line 2: 1 more value"):
        load_manifest(tmp_path / "long.csv")


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
        assert scores["rougeL"] == pytest.approx(100 * rouge.score(reference, answer)["rougeL"].fmeasure)
    same = score_case("rationale", "Pneumonia with consolidation.", "pneumonia with consolidation.")
    assert same["bleu"] == pytest.approx(100.0) and same["rougeL"] == pytest.approx(100.0)  # one scale, 0-100
    # "effusion" and "effusions" share a stem: ROUGE-L counts them as the same word
    assert score_case("report", "left effusion", "left effusions")["rougeL"] == pytest.approx(100.0)


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
    assert scores["accuracy"] == (100.0 if correct else 0.0)


def test_every_score_reads_on_one_scale_in_the_table_the_summary_and_the_gallery(tmp_path):
    """Before, the CLI printed ROUGE-L 86.7 while summary.json and the gallery showed 0.867 beside BLEU 79.9."""
    from RadFMSlicer.evaluation.gallery import write_gallery
    from RadFMSlicer.evaluation.metrics import score_case
    from RadFMSlicer.evaluation.run import format_table, write_summary

    records = [{"id": "r1", "task": "report", "answer": "Small left pleural effusion.", "case_s": 1.0,
                "reference": "Small left pleural effusion, no pneumothorax.", "extra": {}, "seen": []},
               {"id": "m1", "task": "modality", "answer": "CT.", "reference": "CT", "case_s": 1.0, "extra": {},
                "seen": []}]
    for record in records:
        record["scores"] = score_case(record["task"], record["answer"], record["reference"])
    summary = write_summary(tmp_path, records, 2, {"model": {}, "manifest": "m.jsonl"})
    overall = json.loads((tmp_path / "summary.json").read_text())["metrics"]["overall"]
    assert summary["scoring"]["scale"] == "0-100"
    rouge, bleu, accuracy = (overall[m]["mean"] for m in ("rougeL", "bleu", "accuracy"))
    assert 50 < rouge <= 100 and 10 < bleu <= 100 and accuracy == 100.0  # all on sacrebleu's 0-100 scale
    row = next(line for line in format_table(summary).splitlines() if line.startswith("overall"))
    assert f"{rouge:.1f} [" in row and f"{bleu:.1f} [" in row and "100.0 [" in row
    write_gallery(tmp_path, records, summary)
    shown = gallery_data((tmp_path / "index.html").read_text())["summary"]["metrics"]["overall"]
    assert shown["rougeL"]["mean"] == rouge  # the page formats what summary.json holds, one decimal


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


# --- runs --------------------------------------------------------------------------------
@pytest.fixture
def fresh_engine(tiny_engine):
    """The tiny engine's model behind an empty encoding cache (cache counts are asserted)."""
    from RadFMSlicer.engine import RadFMEngine

    return RadFMEngine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.files)


def real_manifest(tmp_path: Path) -> Path:
    four_d = str(NIBABEL_DATA / "example4d.nii.gz")
    return write_jsonl(tmp_path / "m.jsonl", [
        {"id": "ct-modality", "images": [CT], "task": "modality", "reference": "CT", "site": "pydicom"},
        {"id": "mr-report", "images": [MR], "task": "report", "reference": "MR of the head.", "site": "pydicom"},
        {"id": "ct-effusion", "images": [CT], "task": "diagnosis", "question": "pleural effusion",
         "reference": "no", "site": "pydicom"},
        {"id": "4d", "images": [four_d], "task": "modality", "reference": "MRI", "site": "nibabel"},
    ])


def test_eval_answers_scores_and_records_a_failed_scan_without_stopping(fresh_engine, tmp_path):
    from RadFMSlicer.evaluation.datasets import load_manifest
    from RadFMSlicer.evaluation.metrics import score_case
    from RadFMSlicer.evaluation.run import read_cases, run_eval
    from RadFMSlicer.generation import GenerationSettings

    summary = run_eval(fresh_engine, load_manifest(real_manifest(tmp_path)), tmp_path / "run",
                       GenerationSettings(max_new_tokens=4), progress=False)
    records = {r["id"]: r for r in read_cases(tmp_path / "run")}
    assert "4D image" in records["4d"]["error"] and "answer" not in records["4d"]
    assert summary["cases"] == {"total": 4, "answered": 3, "failed": 1, "not_run": 0}
    assert summary["failures"] == [{"id": "4d", "error": records["4d"]["error"]}]
    for case_id in ("ct-modality", "mr-report", "ct-effusion"):
        r = records[case_id]
        assert r["scores"] == score_case(r["task"], r["answer"], r["reference"])
        assert (tmp_path / "run" / r["seen"][0]["preview_png"]).is_file()
        assert r["provenance"]["model"]["checkpoint"] == str(fresh_engine.files.folder)
    assert records["ct-effusion"]["extra"] == {"site": "pydicom"}
    # the two CT cases ran one after the other: CT encoded once, MR once
    assert summary["last_run"]["images_encoded"] == 2 and summary["last_run"]["images_from_cache"] == 1
    assert summary["metrics"]["by_column"]["site"]["pydicom"]["cases"] == 3
    assert summary["note"] and "noise" in summary["note"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["metrics"] == summary["metrics"] and on_disk["scoring"]["libraries"]["sacrebleu"]


def test_a_killed_eval_resumes_where_it_stopped(fresh_engine, tmp_path):
    from RadFMSlicer.evaluation.datasets import load_manifest
    from RadFMSlicer.evaluation.run import read_cases, run_eval
    from RadFMSlicer.generation import GenerationSettings

    cases = load_manifest(real_manifest(tmp_path))
    run_eval(fresh_engine, cases, tmp_path / "run", GenerationSettings(max_new_tokens=4), progress=False)
    out = tmp_path / "run" / "cases.jsonl"
    first, second = out.read_text().splitlines()[:2]
    out.write_text(first + "\n" + second[: len(second) // 2])  # killed while writing the second record
    summary = run_eval(fresh_engine, cases, tmp_path / "run", GenerationSettings(max_new_tokens=4), progress=False)
    assert summary["last_run"]["skipped_as_done"] == 1 and summary["last_run"]["answered"] == 2
    assert out.read_text().splitlines()[0] == first
    assert sorted(r["id"] for r in read_cases(tmp_path / "run")) == ["4d", "ct-effusion", "ct-modality", "mr-report"]
    assert summary["cases"]["answered"] == 3 and summary["cases"]["failed"] == 1


def test_resuming_a_run_under_other_settings_is_refused_naming_the_change(fresh_engine, tmp_path):
    from RadFMSlicer.errors import RadFMError
    from RadFMSlicer.evaluation.datasets import load_manifest
    from RadFMSlicer.evaluation.run import run_eval
    from RadFMSlicer.generation import GenerationSettings

    cases = load_manifest(real_manifest(tmp_path))[:1]
    run_eval(fresh_engine, cases, tmp_path / "run", GenerationSettings(max_new_tokens=2), progress=False)
    with pytest.raises(RadFMError, match="other settings.*max_new_tokens.*--force"):
        run_eval(fresh_engine, cases, tmp_path / "run", GenerationSettings(max_new_tokens=3), progress=False)
    summary = run_eval(fresh_engine, cases, tmp_path / "run", GenerationSettings(max_new_tokens=3), progress=False,
                       force=True)
    assert summary["last_run"]["skipped_as_done"] == 1


def test_cli_eval_refuses_a_resume_with_other_settings_before_loading_the_model(capsys, tmp_path, tiny_checkpoint):
    from RadFMSlicer.cli import main

    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "c1", "images": [CT], "task": "modality", "reference": "CT"}])
    run = ["eval", "--checkpoint", str(tiny_checkpoint), "--manifest", str(manifest), "--out", str(tmp_path / "run")]
    assert main(run + ["--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(run + ["--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert "other settings (max_new_tokens: 2 -> 3)" in err and "--force" in err and "Loading" not in err
    assert main(run + ["--max-new-tokens", "2", "--dtype", "bfloat16"]) == 2  # a model fact: compared once loaded
    err = capsys.readouterr().err
    assert "Loading" in err and "other settings (dtype: 'float32' -> 'bfloat16')" in err


def run_folder(path: Path, scores: dict) -> Path:
    """A run folder holding ``{id: scores}`` as answered cases (for comparison logic)."""
    path.mkdir()
    write_jsonl(path / "cases.jsonl", [
        {"id": i, "task": "report" if "bleu" in s else "modality", "reference": "r", "answer": "a", "scores": s}
        for i, s in scores.items()])
    return path


def test_compare_pairs_cases_and_names_the_biggest_changes_both_ways(tmp_path):
    import numpy as np

    from RadFMSlicer.evaluation.compare import compare_runs
    from RadFMSlicer.evaluation.metrics import bootstrap_ci

    a = run_folder(tmp_path / "a", {"c1": {"accuracy": 0.0}, "c2": {"accuracy": 1.0}, "c3": {"accuracy": 1.0},
                                    "r1": {"bleu": 10.0, "rougeL": 0.2}, "r2": {"bleu": 50.0, "rougeL": 0.6},
                                    "gone": {"accuracy": 1.0}})
    b = run_folder(tmp_path / "b", {"c1": {"accuracy": 1.0}, "c2": {"accuracy": 0.0}, "c3": {"accuracy": 1.0},
                                    "r1": {"bleu": 30.0, "rougeL": 0.1}, "r2": {"bleu": 20.0, "rougeL": 0.9}})
    result = compare_runs(a, b)
    acc, bleu = result["metrics"]["accuracy"], result["metrics"]["bleu"]
    assert acc["n"] == 3 and acc["delta"] == 0.0 and acc["changed"] == 2
    assert acc["ci95"] == bootstrap_ci(np.array([1.0, -1.0, 0.0]))
    assert acc["most_improved"] == ["c1"] and acc["most_worsened"] == ["c2"]
    assert bleu["delta"] == pytest.approx(-5.0) and bleu["most_worsened"] == ["r2"]
    assert result["metrics"]["rougeL"]["most_improved"] == ["r2"]
    assert result["cases"] == {"paired": 5, "answers_changed": 0, "only_in_a": 1, "only_in_b": 0}


def test_cli_eval_refuses_a_bad_manifest_before_loading_and_compare_checks_runs(capsys, tmp_path, tiny_checkpoint):
    from RadFMSlicer.cli import main

    manifest = write_jsonl(tmp_path / "m.jsonl", [{"images": ["nope.dcm"], "task": "report", "reference": ""}])
    code = main(["eval", "--checkpoint", str(tiny_checkpoint), "--manifest", str(manifest),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "line 1: empty reference, image not found" in err and "Loading" not in err
    assert main(["eval", "--manifest", str(manifest)]) == 2
    assert "radfm eval needs --checkpoint, --out" in capsys.readouterr().err
    a = run_folder(tmp_path / "a", {"c1": {"accuracy": 0.0}})
    b = run_folder(tmp_path / "b", {"c2": {"accuracy": 0.0}})
    assert main(["eval", "compare", str(a), str(b)]) == 2
    assert "no answered case in common" in capsys.readouterr().err
    assert main(["eval", "compare", str(a), str(a), "--out", str(tmp_path / "cmp")]) == 0
    assert "accuracy" in capsys.readouterr().out and (tmp_path / "cmp" / "compare.json").is_file()


@pytest.mark.parametrize("damage, problem", [
    ('{"model": {"dtype": "bfl', "not JSON"), ('"done"', "not a JSON object but a str"),
    ('{"model": "bf16"}', "model of the wrong type")])
def test_cli_compare_names_a_damaged_summary_in_one_line(capsys, tmp_path, damage, problem):
    from RadFMSlicer.cli import main

    a = run_folder(tmp_path / "a", {"c1": {"accuracy": 0.0}})
    b = run_folder(tmp_path / "b", {"c1": {"accuracy": 1.0}})
    (a / "summary.json").write_text(damage)
    assert main(["eval", "compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{a / 'summary.json'} is damaged ({problem}" in err and "delete it" in err
    assert not (tmp_path / "cmp" / "compare.json").exists()


# --- gallery -----------------------------------------------------------------------------
def test_word_diff_marks_what_the_answer_dropped_and_added():
    from RadFMSlicer.evaluation.gallery import word_diff

    diff = word_diff("no pleural effusion seen", "a small pleural effusion seen today")
    assert diff == [["-", "no"], ["+", "a small"], ["=", "pleural effusion seen"], ["+", "today"]]
    assert word_diff("same words", "same words") == [["=", "same words"]]


def gallery_data(page: str) -> dict:
    start = page.index('<script type="application/json" id="data">') + len('<script type="application/json" id="data">')
    return json.loads(page[start:page.index("</script>", start)])


def test_gallery_is_one_offline_file_with_thumbnails_answers_and_failures(fresh_engine, tmp_path):
    import re

    from RadFMSlicer.evaluation.compare import write_comparison
    from RadFMSlicer.evaluation.datasets import load_manifest
    from RadFMSlicer.evaluation.run import run_eval
    from RadFMSlicer.generation import GenerationSettings

    cases = load_manifest(real_manifest(tmp_path))
    run_eval(fresh_engine, cases, tmp_path / "a", GenerationSettings(max_new_tokens=3), progress=False)
    page = (tmp_path / "a" / "index.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page) and "@import" not in page
    data = gallery_data(page)
    by_id = {c["id"]: c for c in data["cases"]}
    assert by_id["4d"]["error"] and by_id["4d"]["images"] == []
    ct = by_id["ct-modality"]
    assert ct["answer"] is not None and ct["extra"] == {"site": "pydicom"}
    assert data["thumbs"][ct["images"][0]["thumb"]].startswith("data:image/jpeg;base64,")
    # the two CT cases received the same tensor, so the run keeps one montage and the page one thumbnail for both
    assert ct["images"][0]["thumb"] == by_id["ct-effusion"]["images"][0]["thumb"]
    assert ct["images"][0]["full"] == by_id["ct-effusion"]["images"][0]["full"]
    assert sorted(p.parent.name for p in (tmp_path / "a" / "previews").rglob("*.png")) == ["previews"] * 2  # CT, MR
    assert (tmp_path / "a" / ct["images"][0]["full"]).is_file()
    assert "noise" in data["summary"]["note"] and "Research use only" in data["disclaimer"]

    run_eval(fresh_engine, cases, tmp_path / "b", GenerationSettings(max_new_tokens=5), progress=False)
    write_comparison(tmp_path / "a", tmp_path / "b", tmp_path / "cmp")
    data = gallery_data((tmp_path / "cmp" / "index.html").read_text())
    mr = {c["id"]: c for c in data["cases"]}["mr-report"]
    assert mr["b"]["answer"].startswith(mr["answer"]) and len(mr["b"]["answer"]) >= len(mr["answer"])
    assert set(data["compare"]["metrics"]) == {"accuracy", "bleu", "rougeL"}


def synthetic_run(folder: Path) -> Path:
    """A run folder with answered, scored and failed cases and a montage per case (no model needed)."""
    import numpy as np
    from PIL import Image

    from RadFMSlicer.evaluation.metrics import score_case

    (folder / "previews").mkdir(parents=True)
    rows = [("m1", "modality", "CT", "CT scan.", "A"), ("m2", "modality", "MRI", "CT.", "B"),
            ("r1", "report", "No pleural effusion.", "Small pleural effusion.", "A"),
            ("r2", "report", "Normal heart size.", "Normal heart size.", "B")]
    records = []
    for n, (case_id, task, reference, answer, site) in enumerate(rows):
        png = folder / "previews" / f"{case_id}.png"
        Image.fromarray((np.random.default_rng(n).random((64, 96)) * 255).astype(np.uint8)).save(png)
        records.append({"id": case_id, "task": task, "reference": reference, "answer": answer, "extra": {"site": site},
                        "scores": score_case(task, answer, reference), "images": ["x.nii"],
                        "seen": [{"label": "current study", "role": "current", "source": "x.nii",
                                  "shape": [3, 512, 512, 4], "window": {"mode": "window", "preset": "soft_tissue", "center": 40.0,
                                                                         "width": 400.0, "low": -160.0, "high": 240.0},
                                  "preview_png": f"previews/{case_id}.png"}]})
    records.append({"id": "bad", "task": "modality", "reference": "CT", "images": ["y.nii"], "extra": {"site": "B"},
                    "error": "y.nii is a 4D image"})
    write_jsonl(folder / "cases.jsonl", records)
    return folder


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from Debian (apt-get install chromium), driven by Playwright; missing, the tests fail."""
    import shutil

    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("no chromium on PATH: the gallery's browser tests need Debian's chromium "
                    "(apt-get install chromium, as .ci/run does)", pytrace=False)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def test_gallery_sorts_filters_and_opens_a_case_in_a_real_browser(browser, tmp_path):
    from RadFMSlicer.evaluation.gallery import write_gallery
    from RadFMSlicer.evaluation.metrics import breakdown
    from RadFMSlicer.evaluation.run import read_cases

    run = synthetic_run(tmp_path / "run")
    records = read_cases(run)
    answered = [r for r in records if "answer" in r]
    page_file = write_gallery(run, records, {"metrics": breakdown(answered), "note": "toy model",
                                             "cases": {"answered": 4, "failed": 1, "not_run": 0}})
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(page_file.as_uri())
    ids = lambda: page.locator("#body tr.case").evaluate_all("rows => rows.map(r => r.dataset.id)")
    assert ids()[:2] == ["m2", "r1"] and ids()[-1] == "bad"  # worst score first, the failure (no score) last
    page.click("th:text-is('score')")
    assert ids()[:2] == ["m1", "r2"]  # clicking again: best first
    page.click("th:text-is('id')")
    assert ids() == ["bad", "m1", "m2", "r1", "r2"]
    page.select_option("#f-task", "report")
    assert ids() == ["r1", "r2"]
    page.select_option("select[data-key=site]", "A")
    assert ids() == ["r1"]
    page.click("tr[data-id=r1]")
    detail = page.locator("tr.detail")
    assert detail.locator("del").all_text_contents() == ["No"] and detail.locator("ins").all_text_contents() == ["Small"]
    assert detail.locator("img").evaluate("img => img.naturalWidth") == 96
    page.select_option("#f-task", "")
    page.select_option("select[data-key=site]", "")
    page.fill("#f-text", "4d image")
    assert ids() == ["bad"] and "FAILED" in page.locator("tr[data-id=bad]").text_content()
    assert "toy model" in page.locator("#note").text_content()
    assert errors == []


def test_a_large_run_opens_a_page_of_cases_at_a_time_with_readable_thumbnails(browser, tmp_path):
    from bench.gallery import synthetic_run as large_run

    from RadFMSlicer.evaluation.gallery import PAGE_ROWS, write_gallery
    from RadFMSlicer.evaluation.metrics import breakdown

    records = large_run(tmp_path / "run", 2 * PAGE_ROWS + 50)
    page_file = write_gallery(tmp_path / "run", records, {"metrics": breakdown(records), "note": None,
                                                          "cases": {"answered": len(records), "failed": 0, "not_run": 0}})
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(page_file.as_uri())
    rows = lambda: page.locator("#body tr.case").evaluate_all("rows => rows.map(r => r.dataset.id)")
    assert len(rows()) == PAGE_ROWS and "page 1 of 3" in page.locator("#page").text_content()
    page.click("#next")
    page.click("#next")
    assert len(rows()) == 50 and page.locator("#next").is_disabled()
    page.click("th:text-is('id')")  # a sort orders every case, then shows its first page
    assert rows()[:2] == ["case00000", "case00001"] and "page 1 of 3" in page.locator("#page").text_content()
    page.fill("#f-text", "case00449")
    assert rows() == ["case00449"] and "cases 1-1 of 1" in page.locator("#page").text_content()
    page.click("tr[data-id=case00449]")
    image = page.locator("tr.detail img")
    assert image.evaluate("img => img.getBoundingClientRect().width") >= 480  # the 512 px montage, not a 140 px stamp
    link = page.locator("tr.detail a").get_attribute("href")
    assert link == "previews/scan1.png" and (tmp_path / "run" / link).is_file()  # the full-size montage


def test_comparison_page_shows_both_answers_and_the_deltas_in_a_real_browser(browser, tmp_path):
    from RadFMSlicer.evaluation.compare import write_comparison
    from RadFMSlicer.evaluation.metrics import score_case

    a = synthetic_run(tmp_path / "a")
    b = synthetic_run(tmp_path / "b")
    records = [json.loads(line) for line in (b / "cases.jsonl").read_text().splitlines()]
    records[1].update(answer="MRI.", scores=score_case("modality", "MRI.", "MRI"))  # m2 now right
    write_jsonl(b / "cases.jsonl", records)
    page = browser.new_page()
    write_comparison(a, b, tmp_path / "cmp")
    page.goto((tmp_path / "cmp" / "index.html").as_uri())
    row = page.locator("tr[data-id=m2] td").all_text_contents()
    assert row[:6] == ["m2", "modality", "0.0", "100.0", "100.0", "differ"]
    assert page.locator("tr[data-id=m1] td").nth(5).text_content() == "same"
    headings = page.locator("#head th").all_text_contents()
    assert headings[2:4] == ["score A (a)", "score B (b)"] and headings[-2:] == ["answer A (a)", "answer B (b)"]
    assert page.locator("tr[data-id=m2] td").nth(-1).text_content() == "MRI."  # B's answer under B's name
    assert "p (approximate randomization)" in page.locator("#summary").text_content()
    page.click("tr[data-id=m2]")
    answers = page.locator("tr.detail pre").all_text_contents()
    assert "CT." in answers and "MRI." in answers
    assert "a vs b" in page.title()


def test_eval_benchmark_counts_what_the_encoding_cache_saved(tmp_path, fixture_dir, capsys):
    from bench import evaluation
    from bench.common import Recorder

    recorder = Recorder(tmp_path / "evaluation.jsonl")
    evaluation.run(recorder, cases=6, new_tokens=2)  # CT asked 5 questions, then MR once
    baseline, cached = recorder.results
    assert baseline.baseline and baseline.extra["images_encoded"] == 6 and baseline.extra["images_from_cache"] == 0
    assert cached.extra["images_encoded"] == 2 and cached.extra["images_from_cache"] == 4
    assert "x_baseline" in capsys.readouterr().out


def test_eval_with_attention_writes_each_cases_map_and_shows_it_in_the_gallery(fresh_engine, tmp_path):
    import SimpleITK as sitk

    from RadFMSlicer.attention import LABEL
    from RadFMSlicer.evaluation.datasets import load_manifest
    from RadFMSlicer.evaluation.run import read_cases, run_eval
    from RadFMSlicer.generation import GenerationSettings

    cases = load_manifest(real_manifest(tmp_path))[:2]  # the CT and the MR
    summary = run_eval(fresh_engine, cases, tmp_path / "run", GenerationSettings(max_new_tokens=2), progress=False,
                       attention=True)
    assert summary["last_run"]["images_encoded"] == 2 and fresh_engine.cache.misses == 0  # answers reused the pass
    for record in read_cases(tmp_path / "run"):
        looked = record["provenance"]["attention"]
        written = sitk.ReadImage(str(tmp_path / "run" / looked["file"]))
        assert written.GetSize() == sitk.ReadImage(record["images"][0]).GetSize() and looked["label"] == LABEL
    data = gallery_data((tmp_path / "run" / "index.html").read_text())
    shown = data["cases"][0]["images"]
    assert [im["role"] for im in shown] == ["current", "attention"] and shown[1]["label"] == LABEL
    assert data["thumbs"][shown[1]["thumb"]].startswith("data:image/jpeg;base64,")
