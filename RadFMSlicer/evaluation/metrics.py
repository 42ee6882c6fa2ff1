"""Scores of answers against references, from maintained libraries, with bootstrap intervals.

Which score a case gets depends on what its reference is:

* open text (``report``, ``rationale``, ``vqa`` with a free-text reference): sentence BLEU
  from sacrebleu (13a tokenisation, lowercased, exponential smoothing, effective order) and
  ROUGE-L F1 from rouge-score (Porter stemming);
* closed answers (``diagnosis``, ``modality``, ``vqa`` whose reference is yes/no):
  accuracy after the normalisation in :data:`NORMALISATION`.

Every score is on one scale, 0-100 (:data:`SCALE`), as sacrebleu gives BLEU: ROUGE-L F1 is
multiplied by 100 and a case's accuracy is 100 or 0, so the mean is a percentage. The CLI's
table, ``summary.json``, the gallery and ``compare`` all show these numbers as they are.

A run's score is the mean over its cases with a 95 % percentile bootstrap interval
(:func:`bootstrap_ci`, numpy, fixed seed, so a rerun reproduces it). The summary records the
normalisation text, the bootstrap settings and the library versions, so two summaries
can be told apart by what produced them.
"""

import re
from importlib.metadata import version

import numpy as np

CLOSED_TASKS = ("diagnosis", "modality")
OPEN_METRICS = ("bleu", "rougeL")
SCALE = "0-100"  # every score: accuracy in %, BLEU as sacrebleu gives it, ROUGE-L F1 x 100
RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95

YES = ("yes", "yeah", "yep", "true", "positive", "present")
NO = ("no", "not", "none", "negative", "absent", "false", "without")
# label -> spellings (matched as whole words, lowercased; the earliest mention in an answer wins)
MODALITIES = {
    "CT": ("ct", "cta", "cect", "computed tomography", "computerized tomography", "cat scan"),
    "MRI": ("mri", "mr", "magnetic resonance", "mra", "flair", "t1", "t2", "t1-weighted", "t2-weighted", "dwi"),
    "X-ray": ("x-ray", "xray", "x ray", "radiograph", "radiography", "plain film", "cr", "dx"),
    "ultrasound": ("ultrasound", "us", "sonography", "sonogram", "ultrasonography", "doppler", "echocardiography"),
    "PET": ("pet", "pet-ct", "positron emission tomography"),
    "mammography": ("mammography", "mammogram", "mg"),
    "angiography": ("angiography", "angiogram", "dsa"),
}
NORMALISATION = {
    "yes/no": ("lowercase, punctuation removed; the first word decides: "
               f"{'/'.join(YES)} -> yes, {'/'.join(NO)} -> no, anything else -> unrecognised (counted wrong)"),
    "modality": ("lowercase; the earliest whole-word mention of a known spelling gives the label ("
                 + "; ".join(f"{label}: {', '.join(names)}" for label, names in MODALITIES.items())
                 + "); a reference without a known spelling is compared with the whole answer, both lowercased "
                 "with punctuation removed"),
    "bleu": "sacrebleu sentence BLEU (0-100) against the one reference",
    "rougeL": "rouge-score ROUGE-L F1 x 100 (0-100), Porter stemmer",
    "accuracy": "100 if the normalised answer equals the normalised reference, else 0 (the mean is a percentage)",
}
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_MODALITY_PATTERN = re.compile(
    r"\b(" + "|".join(sorted((re.escape(n) for names in MODALITIES.values() for n in names), key=len, reverse=True))
    + r")\b")
_MODALITY_OF = {n: label for label, names in MODALITIES.items() for n in names}

_scorers: dict = {}


def _bleu():
    if "bleu" not in _scorers:
        from sacrebleu.metrics import BLEU

        _scorers["bleu"] = BLEU(effective_order=True, lowercase=True)
    return _scorers["bleu"]


def _rouge():
    if "rouge" not in _scorers:
        from rouge_score import rouge_scorer

        _scorers["rouge"] = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _scorers["rouge"]


def yes_no(text: str) -> str | None:
    """``"yes"``, ``"no"`` or None, from the first word (see :data:`NORMALISATION`)."""
    words = _WORD.findall(text.lower())
    if not words:
        return None
    return "yes" if words[0] in YES else "no" if words[0] in NO else None


def modality(text: str) -> str | None:
    """The modality label an answer names first, or None."""
    match = _MODALITY_PATTERN.search(text.lower())
    return _MODALITY_OF[match.group(1)] if match else None


def _plain(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def is_closed(task: str, reference: str) -> bool:
    """Closed answers are scored by accuracy, open text by BLEU and ROUGE-L."""
    return task in CLOSED_TASKS or (task == "vqa" and yes_no(reference) is not None and len(reference.split()) <= 2)


def score_case(task: str, answer: str, reference: str) -> dict:
    """Per-case scores: ``{"accuracy"}`` for closed answers, ``{"bleu", "rougeL"}`` for open text."""
    if is_closed(task, reference):
        if task != "modality":
            expected, got = yes_no(reference), yes_no(answer)
        elif modality(reference) is not None:
            expected, got = modality(reference), modality(answer)
        else:
            expected, got = _plain(reference), _plain(answer)
        return {"accuracy": 100.0 if got is not None and got == expected else 0.0, "normalised_answer": got,
                "normalised_reference": expected}
    return {"bleu": float(_bleu().sentence_score(answer, [reference]).score),
            "rougeL": 100 * float(_rouge().score(reference, answer)["rougeL"].fmeasure)}


def case_score(scores: dict | None) -> float | None:
    """One number per case for ranking (worst first, most changed): accuracy, else ROUGE-L F1."""
    if not scores:
        return None
    return scores.get("accuracy", scores.get("rougeL"))


def bootstrap_ci(values, resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values`` (cases resampled with replacement)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return [float(low), float(high)]


def summarise(scores: list[dict]) -> dict:
    """``{"cases": n, metric: {"mean", "ci95", "n"}}``, each metric over the cases that have it."""
    out = {"cases": len(scores)}
    for metric in ("accuracy", *OPEN_METRICS):
        values = [s[metric] for s in scores if metric in s]
        if values:
            out[metric] = {"mean": float(np.mean(values)), "ci95": bootstrap_ci(values), "n": len(values)}
    return out


def breakdown(cases: list[dict]) -> dict:
    """Metrics overall, per task and per value of each extra column (``cases``: answered case records)."""
    by_task, by_column = {}, {}
    for case in cases:
        by_task.setdefault(case["task"], []).append(case["scores"])
        for key, value in (case.get("extra") or {}).items():
            if isinstance(value, (str, int, float, bool)):
                by_column.setdefault(key, {}).setdefault(str(value), []).append(case["scores"])
    return {
        "overall": summarise([c["scores"] for c in cases]),
        "by_task": {task: summarise(s) for task, s in sorted(by_task.items())},
        "by_column": {key: {value: summarise(s) for value, s in sorted(groups.items())}
                      for key, groups in sorted(by_column.items())},
    }


def provenance() -> dict:
    """How the scores were made: normalisation, bootstrap settings, library versions."""
    return {
        "scale": SCALE,
        "normalisation": dict(NORMALISATION),
        "bleu_signature": bleu_signature(),
        "bootstrap": {"method": "percentile", "resamples": RESAMPLES, "seed": SEED, "confidence": CONFIDENCE},
        "libraries": {name: version(name) for name in ("sacrebleu", "rouge-score", "numpy")},
    }


def bleu_signature() -> str:
    """sacrebleu's own description of its settings (it needs one scored pair to know the reference count)."""
    bleu = _bleu()
    bleu.sentence_score("a", ["a"])
    return bleu.get_signature().format()
