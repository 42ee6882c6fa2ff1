"""How long a command takes to answer when it needs no model, against importing the model's libraries.

Run: python -m bench.startup [--repeats 7]

Each command runs in a fresh Python (as a user starts it), round after round, every command
once per round so that a slow spell of this shared machine hits all of them alike; the median
counts. The baseline is ``python -c "import torch, transformers"`` in the same rounds; each row
is a ratio to it, next to its goal (help and errors 0.15x; a preview and ``ask --server`` up to
the request being sent 0.4x). Prints JSON lines (also appended to ``bench/results/startup.jsonl``)
and a table.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom.data
import SimpleITK as sitk

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "bench" / "results" / "startup.jsonl"
FIXTURE = Path(os.environ.get("RADFM_FIXTURE", PROJECT.parent / "shared" / "fixtures" / "radfm-tiny"))
CT_SMALL = pydicom.data.get_testdata_file("CT_small.dcm")
BASELINE = "import torch, transformers"


def commands(work: Path) -> list[tuple[str, float | None, list[str]]]:
    """``(name, goal as a ratio, argv after python)``; the first is the baseline."""
    ct = work / "ct-512x512x100.nii.gz"
    scan = sitk.GetImageFromArray(phantom_ct())
    scan.SetSpacing((0.7, 0.7, 2.5))
    sitk.WriteImage(scan, str(ct))
    radfm = ["-m", "RadFMSlicer.cli"]
    ask = [*radfm, "ask", "--checkpoint", str(FIXTURE)]
    return [
        (f'python -c "{BASELINE}"', None, ["-c", BASELINE]),
        ("radfm --help", 0.15, [*radfm, "--help"]),
        ("radfm ask: unknown flag", 0.15, [*ask, "--image", CT_SMALL, "--imagee", "x"]),
        ("radfm ask: scan not found", 0.15, [*ask, "--image", str(work / "missing.nii.gz")]),
        ("radfm ask: bad --window", 0.15, [*ask, "--image", CT_SMALL, "--window", "40"]),
        ("radfm ask: bad --top-p", 0.15, [*ask, "--image", CT_SMALL, "--top-p", "2"]),
        ("radfm preview CT_small.dcm", 0.4, [*radfm, "preview", "--image", CT_SMALL, "--out", str(work / "a.png")]),
        ("radfm preview 512x512x100 CT", 0.4, [*radfm, "preview", "--image", str(ct), "--out", str(work / "b.png")]),
        ("radfm ask --server (nothing listening)", 0.4,
         [*radfm, "ask", "--server", "http://127.0.0.1:9", "--image", str(ct), "--question", "Any mass?"]),
    ]


def phantom_ct(slices: int = 100, size: int = 512) -> np.ndarray:
    """int16 ``[slices, rows, cols]`` HU: air, a soft-tissue body, two lungs, a bone ring, scanner noise
    (it compresses as a CT does, which uniform noise would not)."""
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    body = np.where((x / 0.85) ** 2 + (y / 0.65) ** 2 < 1, 40, -1000)
    body = np.where(((np.abs(x) - 0.38) / 0.25) ** 2 + (y / 0.45) ** 2 < 1, -850, body)
    body = np.where(np.abs(np.hypot(x, y - 0.4) - 0.12) < 0.03, 900, body)
    noise = np.random.default_rng(0).normal(0, 15, (slices, size, size))
    return (body[None] + noise).astype(np.int16)


def seconds(argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], env=env, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="rounds (default 7; the first, untimed, warms the disk)")
    args = parser.parse_args(argv)
    if not (FIXTURE / "Language_files").is_dir():
        raise SystemExit(f"the benchmark needs the fixture checkpoint: {FIXTURE} not found (set RADFM_FIXTURE)")
    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "python": platform.python_version(),
           "cpus": os.cpu_count(), "load_average": [round(v, 1) for v in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="radfm-bench-startup-") as work:
        cases = commands(Path(work))
        times = {name: [] for name, _, _ in cases}
        for round_ in range(args.repeats + 1):
            for name, _, command in cases:
                took = seconds(command)
                if round_:
                    times[name].append(took)
    base = statistics.median(times[cases[0][0]])
    rows = [("command", "median s", "x baseline", "goal", "")]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as results:
        for name, goal, _ in cases:
            median = statistics.median(times[name])
            ratio = median / base
            line = {"what": name, "median_s": round(median, 3), "runs_s": [round(t, 3) for t in times[name]],
                    "x_baseline": round(ratio, 3), "goal_x": goal, "run": run}
            print(json.dumps(line), flush=True)
            results.write(json.dumps(line) + "\n")
            verdict = "" if goal is None else ("ok" if ratio <= goal else "OVER")
            rows.append((name, f"{median:.2f}", f"{ratio:.2f}", "" if goal is None else f"<= {goal}", verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    print("\n" + "\n".join([table[0], "-+-".join("-" * w for w in widths), *table[1:]]))


if __name__ == "__main__":
    main()
