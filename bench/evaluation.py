"""``radfm eval`` over N cases on a tiny checkpoint, with the encoding cache and without it.

``python -m bench.evaluation [--cases 50] [--new-tokens 16]``

Besides the wall time, each line gives the time the cases spent encoding (``encode_s``)
and generating (``generate_s``): on a shared machine generation swings with the load, so
the encoding time is the direct measure of what the cache saves. ``case_rest_s`` is the rest
of the cases' own time (reading and preparing scans, drawing previews, scoring) and
``outside_cases_s`` what the run spends besides its cases (summary, gallery, records).

The manifest cycles through the real scans shipped in pydicom and nibabel, several tasks
per scan (as a researcher asks report, modality and yes/no questions of one study), so
a scan recurs. The baseline runs the same cases with the cache switched off
(``cache_size=0``), so every case encodes its scan; both runs share one loaded model and
take turns with a fresh run folder each.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel
import pydicom.data

from RadFMSlicer.engine import RadFMEngine
from RadFMSlicer.evaluation.datasets import load_manifest
from RadFMSlicer.evaluation.records import read_cases
from RadFMSlicer.evaluation.run import run_eval
from RadFMSlicer.generation import GenerationSettings
from RadFMSlicer.testing import make_tiny_checkpoint

from .common import RESULTS, Recorder, Result, tokenizer_model

NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"
SCANS = [pydicom.data.get_testdata_file("CT_small.dcm"), pydicom.data.get_testdata_file("MR_small.dcm"),
         str(NIBABEL_DATA / "anatomical.nii"), str(NIBABEL_DATA / "standard.nii.gz")]
QUESTIONS = [("modality", None, "CT"), ("report", None, "No acute abnormality."),
             ("diagnosis", "pleural effusion", "no"), ("vqa", "Is the study normal", "yes"),
             ("rationale", None, "No disease; normal anatomy.")]


def write_manifest(folder: Path, cases: int) -> Path:
    """``cases`` rows: each scan asked every question in turn (scans recur every len(QUESTIONS) rows)."""
    rows = []
    for n in range(cases):
        scan = SCANS[(n // len(QUESTIONS)) % len(SCANS)]
        task, question, reference = QUESTIONS[n % len(QUESTIONS)]
        rows.append({"id": f"case{n:03d}", "images": [scan], "task": task, "question": question,
                     "reference": reference})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(recorder: Recorder, cases: int = 50, new_tokens: int = 16) -> None:
    with tempfile.TemporaryDirectory(prefix="radfm-bench-eval-") as work:  # the checkpoint, manifest and run folders
        _run(recorder, cases, new_tokens, Path(work))


def _run(recorder: Recorder, cases: int, new_tokens: int, work: Path) -> None:
    checkpoint = make_tiny_checkpoint(work / "tiny", tokenizer_model=tokenizer_model())
    manifest = load_manifest(write_manifest(work, cases))
    loaded = RadFMEngine.load(checkpoint)
    settings = GenerationSettings(max_new_tokens=new_tokens)
    run_eval(loaded, manifest[:2], work / "warm-up", settings, progress=False)  # untimed: first-call costs
    for variant, cache_size, baseline in (("no encoding cache", 0, True), ("encoding cache", 8, False)):
        engine = RadFMEngine(loaded.model, loaded.tokenizer, loaded.files, cache_size=cache_size)
        started = time.perf_counter()
        summary = run_eval(engine, manifest, work / variant.replace(" ", "-"), settings, progress=False)
        wall = time.perf_counter() - started
        last = summary["last_run"]
        answered = [r for r in read_cases(work / variant.replace(" ", "-")) if "answer" in r]
        timings = [r["provenance"]["timing"] for r in answered]
        encode_s, generate_s = (sum(t[key] for t in timings) for key in ("prepare_and_encode_s", "generate_s"))
        cases_s = sum(r["case_s"] for r in answered)
        recorder.add(Result(
            "radfm eval, tiny checkpoint", "eval", variant, {"cases": cases, "new_tokens": new_tokens,
                                                             "distinct_scans": len(SCANS)},
            wall, baseline, {"per_case_s": round(wall / cases, 3), "images_encoded": last["images_encoded"],
                             "encode_s": round(encode_s, 2), "generate_s": round(generate_s, 2),
                             # the rest of each case (reading and preparing the scan, previews, scoring) and
                             # what the run does besides its cases (the summary, the gallery, the records)
                             "case_rest_s": round(cases_s - encode_s - generate_s, 2),
                             "outside_cases_s": round(wall - cases_s, 2),
                             "images_from_cache": last["images_from_cache"], "failed": last["failed"]}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    recorder = Recorder(RESULTS / "evaluation.jsonl")
    run(recorder, args.cases, args.new_tokens)
    print()
    print(recorder.table())


if __name__ == "__main__":
    main()
