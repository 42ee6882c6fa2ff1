"""Scores of answers against references, from maintained libraries, with bootstrap intervals.

Which score a case gets depends on what its reference is:

* open text (``report``, ``rationale``, ``vqa`` with a free-text reference): sentence BLEU
  from sacrebleu (13a tokenisation, lowercased, exponential smoothing, effective order) and
  ROUGE-L F1 from rouge-score (Porter stemming);
* closed answers (``diagnosis``, ``modality``, ``vqa`` whose reference is yes/no):
  accuracy after the normalisation in :data:`NORMALISATION`.

Every score is on one scale, 0-100 (:data:`SCALE`), as sacrebleu gives BLEU: ROUGE-L F1 and
the clinical metrics' F1s and shares are multiplied by 100 and a case's accuracy is 100 or 0,
so the mean is a percentage (RadCliQ, a composite where lower is better, is kept as it is).
The CLI's table, ``summary.json``, the gallery and ``compare`` all show these numbers as they are.

Open text can also get the clinical metrics the field publishes (RadGraph F1, RaTEScore,
BERTScore, CheXbert, RadBERT-CT, RadCliQ, GREEN), computed by radeval (``RadFMSlicer[metrics]``)
on models it loads from the Hugging Face cache: :class:`ClinicalScorer`.

:data:`METRICS` is the one table of score names: how each is shown (its label, and whether its
0-1 value is stored x100), what computing it needs and what it was trained on; the
summary, the gallery, the comparison and the CLI all read it.

A run's score is the mean over its cases with a 95 % percentile bootstrap interval
(:func:`bootstrap_ci`, numpy, fixed seed, so a rerun reproduces it). The summary records the
normalisation text, the bootstrap settings and the library versions, so two summaries
can be told apart by what produced them.
"""

import os
import re
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from ..errors import RadFMError

CLOSED_TASKS = ("diagnosis", "modality")
SCALE = "0-100"  # every score but RadCliQ: accuracy in %, BLEU as sacrebleu gives it, F1s and shares x 100
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

CHEST_X_RAY = "chest X-ray reports"


@dataclass(frozen=True)
class Metric:
    """One per-case score: how it is shown, what computing it needs, what it was trained on."""

    label: str
    fraction: bool = False  # computed on 0-1 (an F1, a share of labels): stored x100, so it reads 0-100 as the others
    higher_is_better: bool = True
    radeval: str | None = None  # the radeval metric computing it; None: computed here, needs no model weights
    weights: str | None = None  # what to fetch from the Hugging Face hub before it can run
    trained_on: str | None = None  # named in the summary when a run's images are not of this kind
    digits: int = 1  # decimals shown

    def on_scale(self, value: float) -> float:
        """A computed value as it is stored and shown (see :data:`SCALE`)."""
        return value * 100 if self.fraction else value

    def text(self, value: float, sign: bool = False) -> str:
        """``value`` as the summary, the CLI and the gallery show it (``sign``: a delta's + or -)."""
        return f"{value:{'+' if sign else ''}.{self.digits}f}"


_RRG = "StanfordAIMI/RRG_scorers"
METRICS = {
    "accuracy": Metric("accuracy %"),  # a case scores 100 or 0: the mean is a percentage
    "bleu": Metric("BLEU"),  # sacrebleu's 0-100
    "rougeL": Metric("ROUGE-L"),  # F1 x 100 (score_case)
    "bertscore": Metric("BERTScore", fraction=True, radeval="bertscore", weights="distilbert-base-uncased"),
    "radgraph_simple": Metric("RadGraph F1 simple", fraction=True, radeval="radgraph", weights=_RRG,
                              trained_on=CHEST_X_RAY),
    "radgraph_partial": Metric("RadGraph F1 partial", fraction=True, radeval="radgraph", weights=_RRG,
                               trained_on=CHEST_X_RAY),
    "radgraph_complete": Metric("RadGraph F1 complete", fraction=True, radeval="radgraph", weights=_RRG,
                                trained_on=CHEST_X_RAY),
    "ratescore": Metric("RaTEScore", fraction=True, radeval="ratescore",
                        weights="Angelakeke/RaTE-NER-Deberta and FremyCompany/BioLORD-2023-C"),
    "f1chexbert_sample_acc_5": Metric("CheXbert accuracy (5 findings)", fraction=True, radeval="f1chexbert",
                                      weights=f"{_RRG} and bert-base-uncased", trained_on=CHEST_X_RAY),
    "f1chexbert_sample_acc_all": Metric("CheXbert accuracy (14 findings)", fraction=True, radeval="f1chexbert",
                                        weights=f"{_RRG} and bert-base-uncased", trained_on=CHEST_X_RAY),
    "f1radbert_ct_sample_acc": Metric("RadBERT-CT accuracy", fraction=True, radeval="f1radbert_ct",
                                      weights="IAMJB/RadBERT-CT"),
    "radcliq_v1": Metric("RadCliQ-v1", higher_is_better=False, radeval="radcliq",  # a composite, not a share
                         weights=f"{_RRG} and distilbert-base-uncased", trained_on=CHEST_X_RAY, digits=3),
    "green": Metric("GREEN", fraction=True, radeval="green", weights="StanfordAIMI/GREEN-radllama2-7b (7B, a GPU)",
                    trained_on=CHEST_X_RAY),
}
CLINICAL = tuple(dict.fromkeys(m.radeval for m in METRICS.values() if m.radeval))  # radfm eval --metrics choices


def metric(key: str) -> Metric:
    """The table's entry for ``key``; a score radeval returns that the table does not list is shown as it is."""
    return METRICS.get(key) or Metric(key)


def ordered(keys) -> list[str]:
    """Metric names in the table's order, then any others."""
    keys = set(keys)
    return [k for k in METRICS if k in keys] + sorted(keys - set(METRICS))


def score_keys(scores: "list[dict]") -> list[str]:
    """The numeric scores present in any of ``scores`` (per-case score dicts), :func:`ordered`."""
    return ordered(k for s in scores for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool))


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


def score_case(task: str, answer: str, reference: str, clinical: "ClinicalScorer | None" = None) -> dict:
    """Per-case scores: ``{"accuracy"}`` for closed answers, ``{"bleu", "rougeL"}`` (and the
    ``clinical`` metrics) for open text."""
    if is_closed(task, reference):
        if task != "modality":
            expected, got = yes_no(reference), yes_no(answer)
        elif modality(reference) is not None:
            expected, got = modality(reference), modality(answer)
        else:
            expected, got = _plain(reference), _plain(answer)
        return {"accuracy": 100.0 if got is not None and got == expected else 0.0, "normalised_answer": got,
                "normalised_reference": expected}
    scores = {"bleu": float(_bleu().sentence_score(answer, [reference]).score),
              "rougeL": 100 * float(_rouge().score(reference, answer)["rougeL"].fmeasure)}
    return scores | (clinical.score(answer, reference) if clinical else {})


class ClinicalScorer:
    """The radeval metrics of ``radfm eval --metrics``, each loaded once before the run.

    A metric whose model cannot be loaded (its weights not in the Hugging Face cache, say, with
    ``HF_HUB_OFFLINE=1`` or no network) is named in :attr:`unavailable` with what to fetch, and
    the run goes on with the others.
    """

    def __init__(self, names: "list[str]"):
        unknown = [n for n in names if n not in CLINICAL]
        if unknown:
            raise RadFMError(f"unknown metric(s) {', '.join(unknown)} for --metrics; choose from {', '.join(CLINICAL)} "
                             "(BLEU, ROUGE-L and accuracy are always scored)")
        try:
            from radeval import RadEval
        except ImportError as exc:
            raise RadFMError(f"--metrics needs radeval: pip install 'RadFMSlicer[metrics]' ({exc})") from None
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.evaluators, self.unavailable = {}, {}
        for name in dict.fromkeys(names):
            try:
                self.evaluators[name] = RadEval(metrics=[name], per_sample=True, show_progress=False)
            except Exception as exc:  # noqa: BLE001 -- any failure to load one metric's model: name it, go on
                reason = " ".join(str(exc).split())[:200] or type(exc).__name__
                weights = next(m.weights for m in METRICS.values() if m.radeval == name)
                self.unavailable[name] = (f"{name} not scored: its model could not be loaded ({reason}); fetch "
                                          f"{weights} into the Hugging Face cache (huggingface-cli download REPO) "
                                          "and rerun")

    def score(self, answer: str, reference: str) -> dict:
        """One case's scores by each loaded metric (radeval's per-sample values); a metric that fails on
        this case is named under ``clinical_errors`` and the others still score it."""
        out = {}
        for name, evaluator in self.evaluators.items():
            try:
                scored = evaluator([reference], [answer])
            except Exception as exc:  # noqa: BLE001 -- one metric failing one case costs that score only
                out.setdefault("clinical_errors", {})[name] = " ".join(str(exc).split())[:200] or type(exc).__name__
                continue
            for key, values in scored.items():
                if isinstance(values, list) and len(values) == 1 and isinstance(values[0], (int, float)):
                    out[key] = metric(key).on_scale(float(values[0]))
        return out

    def describe(self) -> dict:
        return {"metrics": list(self.evaluators), "unavailable": dict(self.unavailable),
                "radeval": _version("radeval")}


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


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
    block = max(1, 2_000_000 // values.size)  # resamples at a time: 10,000 cases x 2,000 at once would take 320 MB
    means = np.concatenate([values[rng.integers(0, values.size, size=(min(block, resamples - start), values.size))]
                            .mean(axis=1) for start in range(0, resamples, block)])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return [float(low), float(high)]


def summarise(scores: list[dict]) -> dict:
    """``{"cases": n, metric: {"mean", "ci95", "n"}}``, each metric over the cases that have it."""
    out = {"cases": len(scores)}
    for key in score_keys(scores):
        values = [s[key] for s in scores if key in s]
        out[key] = {"mean": float(np.mean(values)), "ci95": bootstrap_ci(values), "n": len(values)}
    return out


def domain_notes(cases: list[dict]) -> list[str]:
    """What to keep in mind reading a run's scores: a metric trained on chest X-ray reports scoring
    reports of CT or MR volumes (a case whose first image has more than one slice)."""
    volumes = any((case.get("seen") or [{}])[0].get("shape", [0])[-1] > 1 for case in cases)
    present = score_keys([c.get("scores") or {} for c in cases])
    return [f"{metric(k).label} comes from a model trained on {metric(k).trained_on}; this run's images are "
            "CT/MR volumes, so read it as indicative only" for k in present
            if volumes and metric(k).trained_on == CHEST_X_RAY]


def table() -> dict:
    """:data:`METRICS` as the summary and the gallery carry it."""
    return {key: asdict(m) for key, m in METRICS.items()}


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


def provenance(clinical: "ClinicalScorer | None" = None) -> dict:
    """How the scores were made: normalisation, bootstrap settings, library versions, the metric table."""
    return {
        "scale": SCALE,
        "normalisation": dict(NORMALISATION),
        "bleu_signature": bleu_signature(),
        "bootstrap": {"method": "percentile", "resamples": RESAMPLES, "seed": SEED, "confidence": CONFIDENCE},
        "libraries": {name: version(name) for name in ("sacrebleu", "rouge-score", "numpy")},
        "clinical": clinical.describe() if clinical else None,
        "metrics": table(),
    }


def bleu_signature() -> str:
    """sacrebleu's own description of its settings (it needs one scored pair to know the reference count)."""
    bleu = _bleu()
    bleu.sentence_score("a", ["a"])
    return bleu.get_signature().format()
