"""The evaluation gallery of a large run: writing ``index.html`` and using it in headless Chromium.

``python -m bench.gallery [--cases 10000]``

A synthetic run folder (no model: the page is what is measured) of ``--cases`` cases on two
scans, as a researcher's benchmark run asks many questions of few studies: report, yes/no and
modality cases with answers and references of realistic length, and a prompt each. Measured:
the time to write the page and its size, then in Debian's headless Chromium (Playwright) the
time from opening the file until the table is laid out, and the time of a sort (a click on
a column heading until the new order is laid out) and of a text filter. The baseline is the
same command run with ``PYTHONPATH`` on another checkout (the commit before a change).
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from RadFMSlicer.evaluation.gallery import write_gallery
from RadFMSlicer.evaluation.metrics import breakdown, score_case

from .common import RESULTS, Recorder, Result

REPORTS = ["The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal.",
           "Small left pleural effusion with adjacent atelectasis. No focal consolidation.",
           "Multiple bilateral pulmonary nodules, the largest 8 mm in the right upper lobe."]
TASKS = [("report", None), ("diagnosis", "pleural effusion"), ("modality", None)]


def synthetic_run(folder: Path, cases: int) -> list[dict]:
    """``cases`` answered records on two scans (previews written), as ``cases.jsonl`` holds them."""
    (folder / "previews").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for scan in range(2):  # a montage the size radfm draws: 8 x 4 tiles of 64 px
        pixels = rng.integers(0, 255, (256, 512), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "previews" / f"scan{scan}.png")
    records = []
    for n in range(cases):
        task, question = TASKS[n % len(TASKS)]
        reference = {"report": REPORTS[n % 3], "diagnosis": "yes" if n % 2 else "no", "modality": "CT"}[task]
        answer = {"report": REPORTS[(n + n // 7) % 3], "diagnosis": "no", "modality": "CT" if n % 5 else "MRI"}[task]
        records.append({
            "id": f"case{n:05d}", "task": task, "question": question, "reference": reference, "answer": answer,
            "images": [f"scan{n % 2}.nii.gz"], "extra": {"site": "AB"[n % 2]}, "scores": score_case(task, answer, reference),
            "prompt": "<image>" * 32 + " Please write a radiology report for this scan.", "case_s": 1.0,
            "seen": [{"label": "current study", "role": "current", "source": f"scan{n % 2}.nii.gz",
                      "shape": [3, 512, 512, 4], "preview_png": f"previews/scan{n % 2}.png"}],
            "provenance": {"model": {"checkpoint": "RadFM", "dtype": "bfloat16"},
                           "timing": {"prepare_and_encode_s": 0.1, "generate_s": 0.9}}})
    (folder / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def browse(page_file: Path) -> dict:
    """Seconds to open the page until laid out, to sort by the id column and to filter by text."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        started = time.perf_counter()
        page.goto(page_file.as_uri(), wait_until="load", timeout=600_000)
        page.evaluate("document.body.offsetHeight")  # laid out
        load_s = time.perf_counter() - started
        timed = """(action) => { const t = performance.now();
            if (action === "sort") document.querySelector("#head th").click();
            else { const f = document.getElementById("f-text"); f.value = "case0999"; f.dispatchEvent(new Event("input")); }
            document.body.offsetHeight; return (performance.now() - t) / 1000; }"""
        sort_s, filter_s = page.evaluate(timed, "sort"), page.evaluate(timed, "filter")
        rows = page.locator("#body tr.case").count()
        browser.close()
    return {"load_s": round(load_s, 3), "sort_s": round(sort_s, 3), "filter_s": round(filter_s, 3)}, rows


def run(recorder: Recorder, cases: int = 10_000, variant: str = "this checkout") -> None:
    with tempfile.TemporaryDirectory(prefix="radfm-bench-gallery-") as work:
        folder = Path(work) / "run"
        records = synthetic_run(folder, cases)
        started = time.perf_counter()
        page_file = write_gallery(folder, records, {"metrics": breakdown(records), "note": None,
                                                    "cases": {"answered": cases, "failed": 0, "not_run": 0}})
        write_s = time.perf_counter() - started
        timings, rows = browse(page_file)
        recorder.add(Result("gallery of a large run, headless Chromium 1400 px", "gallery", variant,
                            {"cases": cases, "scans": 2}, timings["load_s"], False,
                            {"write_s": round(write_s, 2), "page_mb": round(page_file.stat().st_size / 1e6, 1),
                             "rows_in_dom": rows, **timings}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--variant", default="this checkout", help="name of this row (e.g. the commit measured)")
    args = parser.parse_args(argv)
    recorder = Recorder(RESULTS / "gallery.jsonl")
    run(recorder, args.cases, args.variant)
    print()
    print(recorder.table())


if __name__ == "__main__":
    main()
