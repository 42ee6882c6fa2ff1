"""Evaluation manifests: the cases to answer and the references to score them against.

A manifest is JSON lines (one object a line) or CSV with the same columns:

``id``         optional, else the line number (``"line 3"`` in messages, ``"3"`` as the id)
``images``     paths, the first the current study, later ones priors (CSV: ``a.nii;b.nii``)
``task``       ``report``, ``vqa``, ``rationale``, ``modality`` or ``diagnosis``
``question``   needed by ``vqa`` (the question) and ``diagnosis`` (the finding looked for)
``reference``  the expected answer: report text, yes/no, a modality label, free text
``region``     optional ``mask.nii.gz`` or ``mask.nii.gz:LABEL`` aligned with the first image
``box``        optional region box in RAS mm, six numbers ``x0,y0,z0,x1,y1,z1``
anything else  kept and carried through to the results (e.g. ``finding``, ``site``)

Relative paths are relative to the manifest's folder. A RadFM ``.npy`` that holds several
images names one as ``scan.npy#2``. RadFM's own test files and CT-RATE's report CSV are read
as they ship (:mod:`.imports`; ``radfm eval import`` writes them as a manifest, with options). :func:`load_manifest` checks every
row before any model work and names every bad row in one error, so a long run never
stops at case 900 on a typo.
"""

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PromptError, RadFMError
from ..paths import split_npy_index
from ..prompts import TASKS, check_user_text
from ..tables import csv_rows, jsonl_rows, read_text
from .imports import benchmark_rows, detect_format
from .metrics import yes_no

NEEDS_QUESTION = {"vqa": "the question", "diagnosis": "the finding to look for"}
KNOWN_KEYS = ("id", "images", "task", "question", "reference", "region", "box")
MAX_LISTED = 20  # bad rows named in the error; the count says how many more


class ManifestError(RadFMError):
    """A manifest that cannot be evaluated: every bad row named in one line."""


@dataclass
class Case:
    """One manifest row, paths resolved against the manifest's folder."""

    id: str
    images: list[str]
    task: str
    reference: str
    question: str | None = None
    region: str | None = None  # mask path, label after ':' kept as given
    box: list[float] | None = None  # RAS mm, x0 y0 z0 x1 y1 z1
    extra: dict = field(default_factory=dict)
    line: int = 0

    @property
    def region_mask(self) -> tuple[str, int | None] | None:
        """(mask path, label or None) of ``region``."""
        if not self.region:
            return None
        path, _, label = _split_label(self.region)
        return path, int(label) if label else None

    def to_dict(self) -> dict:
        return {"id": self.id, "images": self.images, "task": self.task, "question": self.question,
                "reference": self.reference, "region": self.region, "box": self.box, "extra": self.extra}


def _split_label(spec: str) -> tuple[str, str, str]:
    """``mask.nii.gz:2`` -> (``mask.nii.gz``, ``:``, ``2``); a path without a numeric tail is kept whole."""
    path, sep, label = spec.rpartition(":")
    if sep and label.strip().isdigit() and path:
        return path, sep, label.strip()
    return spec, "", ""


def _rows(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed row or the reason it could not be parsed), blank lines skipped."""
    if path.suffix.lower() == ".json" and read_text(path).lstrip().startswith("["):
        return [(row["source_row"], row) for row in benchmark_rows(path)[0]]  # RadFM's caption/rationale list
    if path.suffix.lower() != ".csv":
        return jsonl_rows(path)
    header, rows = csv_rows(path)
    if "images" not in header and detect_format(header):  # one of RadFM's own test files, as it ships
        return [(row["source_row"], row) for row in benchmark_rows(path)[0]]
    if "images" not in header:
        raise ManifestError(f"{path}: a CSV manifest needs a header row with an 'images' column "
                            f"(found: {', '.join(header) or 'nothing'})")
    return rows


def _images(value, base: Path) -> list[str]:
    if isinstance(value, str):
        value = [v for v in (s.strip() for s in value.split(";")) if v]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("'images' must be a list of paths (CSV: paths separated by ';')")
    return [str(base / v) for v in value]


def _box(value) -> list[float]:
    if isinstance(value, str):
        value = value.replace(";", ",").split(",")
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != 6:
        raise ValueError(f"'box' needs six numbers x0,y0,z0,x1,y1,z1 in RAS mm, got {value!r}")
    return numbers


def _case(row: dict, line: int, base: Path) -> tuple[Case | None, list[str]]:
    """The case of one row, or None and what is wrong with it (every problem, not the first)."""
    problems = []
    task = str(row.get("task") or "").strip()
    if task not in TASKS:
        problems.append(f"unknown task {task!r} (use {', '.join(TASKS)})" if task else
                        f"no task (use {', '.join(TASKS)})")
    reference = row.get("reference")
    reference = "" if reference is None else str(reference).strip()
    if not reference:
        problems.append("empty reference")
    if task == "diagnosis" and reference and yes_no(reference) is None:
        problems.append(f"a diagnosis reference must say yes or no, got {reference!r}")
    question = row.get("question")
    question = str(question).strip() if question not in (None, "") else None
    if task in NEEDS_QUESTION and not question:
        problems.append(f"task {task} needs 'question' ({NEEDS_QUESTION[task]})")
    if question:
        try:
            check_user_text(question, "'question'")
        except PromptError as exc:
            problems.append(str(exc))
    images = []
    try:
        images = _images(row.get("images"), base)
        if not images:
            problems.append("no images")
    except ValueError as exc:
        problems.append(str(exc))
    for image in images:
        if not Path(split_npy_index(image)[0]).exists():
            problems.append(f"image not found: {image}")
    region = row.get("region") or None
    if region is not None:
        path, sep, label = _split_label(str(region))
        region = str(base / path) + sep + label
        if not Path(base / path).is_file():
            problems.append(f"region mask not found: {base / path}")
    box = None
    if row.get("box") not in (None, ""):
        try:
            box = _box(row["box"])
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        return None, problems
    extra = {k: v for k, v in row.items() if k not in KNOWN_KEYS}
    return Case(_case_id(row, line), images, task, reference, question, region, box, extra, line), []


def _case_id(row: dict, line: int) -> str:
    """The row's ``id``, or its line number when it has none."""
    return str(row["id"]).strip() if str(row.get("id") or "").strip() else str(line)


def load_manifest(path: "str | Path") -> list[Case]:
    """Every case of a JSONL or CSV manifest, or one :class:`ManifestError` naming all bad rows."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path} (give a .jsonl or .csv file)")
    base = path.parent
    cases, bad, seen = [], [], {}
    for line, row in _rows(path):
        if isinstance(row, str):
            bad.append(f"line {line}: {row}")
            continue
        case, problems = _case(row, line, base)
        case_id = _case_id(row, line)  # a bad row's id counts too: every error of a row is named at once
        if case_id in seen:
            problems = [f"id {case_id!r} repeats line {seen[case_id]}"] + problems
        seen.setdefault(case_id, line)
        if problems:
            bad.append(f"line {line}: " + ", ".join(problems))
            continue
        cases.append(case)
    if bad:
        more = f"; ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise ManifestError(f"{path}: {len(bad)} bad row(s), fix them and rerun: "
                            + "; ".join(bad[:MAX_LISTED]) + more)
    if not cases:
        raise ManifestError(f"{path} has no cases (one JSON object a line, or CSV rows under a header)")
    return cases
