"""Two runs of one manifest side by side: per-case deltas, paired bootstrap intervals, a paired
significance test, biggest changes.

The runs differ in one setting (bf16 vs int4, two prompts, two checkpoints); each case is
paired with itself, so the interval of the mean delta comes from resampling cases, not
from two independent intervals, and is much tighter when the settings agree on most cases.
Beside it, approximate randomization (:func:`randomization_p`) asks how often the mean delta
would be as large if each case's two answers were swapped at random: its p-value.
"""

import json
from pathlib import Path

import numpy as np

from .. import storage
from ..errors import RadFMError
from . import metrics
from .gallery import write_gallery
from .records import read_cases, read_summary

MOST_CHANGED = 5
PERMUTATIONS = 10_000  # approximate randomization: the p-value's resolution is 1 / (PERMUTATIONS + 1)


def randomization_p(deltas, permutations: int = PERMUTATIONS, seed: int = metrics.SEED) -> float:
    """Two-sided approximate randomization test of paired deltas (B - A): the share of random sign flips
    (each case's A and B swapped with probability 1/2) whose mean delta is at least as far from 0 as the
    observed one, counting the observed one (so never 0)."""
    deltas = np.asarray(deltas, dtype=float)
    observed = abs(deltas.mean())
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, permutations, 1000):  # in blocks: 10,000 x 10,000 cases would not fit in memory
        signs = rng.choice((-1.0, 1.0), size=(min(1000, permutations - start), deltas.size))
        extreme += int(np.count_nonzero(np.abs((signs * deltas).mean(axis=1)) >= observed - 1e-12))
    return (extreme + 1) / (permutations + 1)


def _answered(records: list[dict]) -> dict:
    return {r["id"]: r for r in records if "answer" in r}


def _label(run_dir: Path) -> dict:
    """What distinguishes a run: its folder and model settings, from its summary."""
    summary = read_summary(run_dir)
    model = summary.get("model") or {}
    return {"run": str(run_dir), "dtype": model.get("dtype"), "quantization": model.get("quantization"),
            "checkpoint": model.get("checkpoint"), "settings": summary.get("settings")}


def compare_runs(run_a: "str | Path", run_b: "str | Path",
                 cases_a: list[dict] | None = None, cases_b: list[dict] | None = None) -> dict:
    """Per-metric mean delta (B - A) with its paired 95 % interval, per-case deltas, biggest changes.

    ``cases_a``/``cases_b``: the runs' ``cases.jsonl`` records when the caller has read them already.
    """
    a = _answered(read_cases(run_a) if cases_a is None else cases_a)
    b = _answered(read_cases(run_b) if cases_b is None else cases_b)
    shared = [case_id for case_id in a if case_id in b]
    if not shared:
        raise RadFMError(f"{run_a} and {run_b} have no answered case in common: were they made from one manifest?")
    for case_id in shared:
        if (a[case_id]["task"], a[case_id]["reference"]) != (b[case_id]["task"], b[case_id]["reference"]):
            raise RadFMError(f"case {case_id!r} has a different task or reference in the two runs: "
                             "compare runs of the same manifest")
    cases = []
    for case_id in shared:
        sa, sb = a[case_id]["scores"], b[case_id]["scores"]
        cases.append({
            "id": case_id, "task": a[case_id]["task"], "reference": a[case_id]["reference"],
            "answer_a": a[case_id]["answer"], "answer_b": b[case_id]["answer"], "scores_a": sa, "scores_b": sb,
            "delta": {m: sb[m] - sa[m] for m in metrics.score_keys([sa]) if m in metrics.score_keys([sb])},
        })
    per_metric = {}
    for metric in metrics.score_keys([c["delta"] for c in cases]):
        pairs = [c for c in cases if metric in c["delta"]]
        if not pairs:
            continue
        deltas = np.array([c["delta"][metric] for c in pairs])
        ranked = sorted(pairs, key=lambda c: c["delta"][metric])
        per_metric[metric] = {
            "n": len(pairs),
            "mean_a": float(np.mean([c["scores_a"][metric] for c in pairs])),
            "mean_b": float(np.mean([c["scores_b"][metric] for c in pairs])),
            "delta": float(deltas.mean()), "ci95": metrics.bootstrap_ci(deltas), "p": randomization_p(deltas),
            "changed": int(np.count_nonzero(deltas)),
            "most_improved": [c["id"] for c in reversed(ranked) if c["delta"][metric] > 0][:MOST_CHANGED],
            "most_worsened": [c["id"] for c in ranked if c["delta"][metric] < 0][:MOST_CHANGED],
        }
    return {
        "a": _label(Path(run_a)), "b": _label(Path(run_b)),
        "cases": {"paired": len(shared), "answers_changed": sum(c["answer_a"] != c["answer_b"] for c in cases),
                  "only_in_a": len(set(a) - set(b)), "only_in_b": len(set(b) - set(a))},
        "metrics": per_metric, "per_case": cases, "scoring": metrics.provenance(),
    }


def format_comparison(result: dict) -> str:
    """The comparison as a text table (B - A), then the cases that changed most, both ways."""
    header = (f"{'metric':<22}{'cases':>6}  {'A':>8}{'B':>8}  {'B - A [95% paired CI]':<30}{'p (AR)':>8}"
              f"{'changed':>9}")
    lines = [f"A: {result['a']['run']} ({result['a']['dtype']}, {result['a']['quantization'] or 'no quantization'})",
             f"B: {result['b']['run']} ({result['b']['dtype']}, {result['b']['quantization'] or 'no quantization'})",
             header, "-" * len(header)]
    for key, m in result["metrics"].items():
        text = metrics.metric(key).text
        ci = f"{text(m['delta'], sign=True)} [{text(m['ci95'][0], sign=True)}, {text(m['ci95'][1], sign=True)}]"
        lines.append(f"{metrics.metric(key).label:<22}{m['n']:>6}  {text(m['mean_a']):>8}{text(m['mean_b']):>8}  "
                     f"{ci:<30}{m['p']:>8.4f}{m['changed']:>9}")
    for metric, m in result["metrics"].items():
        for way in ("most_improved", "most_worsened"):
            if m[way]:
                lines.append(f"{metric} {way.replace('_', ' ')}: {', '.join(m[way])}")
    c = result["cases"]
    lines.append(f"{c['answers_changed']} of {c['paired']} paired answers differ in their text; p (AR): approximate "
                 f"randomization, {PERMUTATIONS} paired swaps, two-sided")
    if c["only_in_a"] or c["only_in_b"]:
        lines.append(f"not paired (failed or missing in one run): {c['only_in_a']} only in A, {c['only_in_b']} only in B")
    return "\n".join(lines)


def write_comparison(run_a: "str | Path", run_b: "str | Path", out: "str | Path") -> dict:
    """``OUT/compare.json`` and the side-by-side gallery ``OUT/index.html``; returns the comparison."""
    cases_a, cases_b = read_cases(run_a), read_cases(run_b)
    result = compare_runs(run_a, run_b, cases_a, cases_b)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage.write_text(out / "compare.json", json.dumps(result, indent=2))
    write_gallery(run_a, cases_a, read_summary(run_a), out / "index.html", result, cases_b)
    return result
