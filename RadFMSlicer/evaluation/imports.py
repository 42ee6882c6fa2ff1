"""Published benchmark files as manifest rows: RadFM's own test files and CT-RATE's reports.

Each format is known by its columns (CSV) or keys (JSON), as it ships:

=================  ==============================================  ==================================
format             columns / keys                                  cases
=================  ==============================================  ==================================
radfm-yes-no       ``image_path, disease, label`` (1/0)            diagnosis, reference yes/no
radfm-diagnosis    ``image_path, label``                           vqa "What is the diagnosis ...?"
radfm-modality     ``image_path, answer`` (+ ``modality_set.json``) modality; with the set, a yes and a
                                                                   no question for each scan too
radfm-vqa-3d       ``image_path`` (.npy), ``question, answer``     vqa
radfm-vqa          ``img_root_dir, Figure_path, Question, Answer``  vqa (VQA-RAD, SLAKE, PMC-VQA)
radfm-caption      JSON list: ``npy_path, finding, impression``    report; ``radiographic_features``
                   (+ ``radiographic_features, title, pre, pat``)  adds a rationale case
ct-rate            ``VolumeName, Findings_EN, Impressions_EN``     report
=================  ==============================================  ==================================

Unlike RadFM's test loaders, every row becomes a case (none dropped when its image fails: the
run records the failure), in file order, with one fixed question per task and no random image
position, and the "no" question of a modality pair names another modality (RadFM's loader names
the true one, so its "no" items ask "Is this a CT scan?" of a CT). A RadFM ``.npy`` that holds
several images gives them all, as ``scan.npy#0``, ``scan.npy#1`` ... (the first read as the
current study, the others as priors).
"""

import json
import zlib
from pathlib import Path

import numpy as np

from .. import storage
from ..errors import RadFMError
from ..prompts import TEMPLATES
from ..tables import csv_rows, read_text

OPEN_DIAGNOSIS = "What is the diagnosis for this image?"
MODALITY_YES_NO = "Was this image taken with {modality}?"
FORMATS = {  # name -> the columns (CSV) or keys (JSON entries) that identify it
    "radfm-yes-no": ("image_path", "disease", "label"),
    "radfm-vqa-3d": ("image_path", "question", "answer"),
    "radfm-modality": ("image_path", "answer"),
    "radfm-diagnosis": ("image_path", "label"),
    "radfm-vqa": ("img_root_dir", "Figure_path", "Question", "Answer"),
    "ct-rate": ("VolumeName", "Findings_EN", "Impressions_EN"),
    "radfm-caption": ("npy_path", "finding", "impression"),
}


class BenchmarkError(RadFMError):
    """A benchmark file that cannot be read as any known format, in one line."""


def detect_format(columns) -> str | None:
    """The first format (in :data:`FORMATS` order, most specific first) whose columns are all present."""
    columns = set(columns)
    return next((name for name, needed in FORMATS.items() if set(needed) <= columns), None)


def _entries(path: Path) -> tuple[list[dict], set]:
    """The entries of a JSON list (RadFM's caption/rationale file) or a CSV, and their columns; read as
    manifests are (:mod:`~RadFMSlicer.tables`: UTF-8 with or without a byte-order mark, no column twice)."""
    if path.suffix.lower() == ".json":
        try:
            entries = json.loads(read_text(path))
        except ValueError as exc:
            raise BenchmarkError(f"{path}: not JSON ({exc})") from None
        if isinstance(entries, dict):  # some releases key the entries by case
            entries = list(entries.values())
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise BenchmarkError(f"{path}: RadFM's caption/rationale JSON is a list of objects with npy_path, "
                                 "finding, impression")
        return entries, set().union(*(e.keys() for e in entries)) if entries else set()
    header, rows = csv_rows(path)
    for line, row in rows:
        if isinstance(row, str):
            raise BenchmarkError(f"{path} line {line}: {row}")
    return [{column: row.get(column, "") for column in header} for _, row in rows], set(header)


def _read(path: Path) -> tuple[list[dict], str]:
    """The file's entries (CSV rows or the JSON list) and its format, or a BenchmarkError naming what it holds."""
    entries, columns = _entries(path)
    name = detect_format(columns)
    if name is None:
        known = "; ".join(f"{n}: {', '.join(c)}" for n, c in FORMATS.items())
        raise BenchmarkError(f"{path}: not a known benchmark file (found columns: {', '.join(sorted(columns)) or 'none'}; "
                             f"known: {known})")
    return entries, name


def _text(value) -> str:
    """A cell as text; lists (RadFM's radiographic features) joined with spaces."""
    if isinstance(value, list):
        return " ".join(str(v).strip() for v in value)
    return "" if value is None else str(value).strip()


def _report(findings, impression) -> str:
    return " ".join(part for part in (f"Findings: {_text(findings)}" if _text(findings) else "",
                                      f"Impression: {_text(impression)}" if _text(impression) else "") if part)


def _images(path: str, where: "tuple[Path, tuple[str, str] | None]") -> list[str]:
    """The image(s) of one path, relative ones under the file's folder (``where``: that folder and the
    rebase): a RadFM ``.npy`` of several images gives each as ``path#k``."""
    base, rebase = where
    if rebase and path.startswith(rebase[0]):
        path = rebase[1] + path[len(rebase[0]):]
    path = str(base / path)
    if path.lower().endswith(".npy") and Path(path).is_file():
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape  # the header only
        except (ValueError, OSError):
            return [path]  # the run names what is wrong with it
        if len(shape) == 5 and shape[0] > 1:
            return [f"{path}#{k}" for k in range(shape[0])]
    return [path]


def _ct_rate_volume(name: str, images: Path) -> str:
    """CT-RATE's ``valid_1_a_1.nii.gz`` under ``images``: flat, or in its release layout
    ``valid_1/valid_1_a/valid_1_a_1.nii.gz``."""
    parts = name.split("_")
    nested = images / "_".join(parts[:2]) / "_".join(parts[:3]) / name
    return str(nested if not (images / name).exists() and nested.exists() else images / name)


def _cases(entry: dict, fmt: str, modalities: list[str], where, images_dir: Path) -> list[tuple[str, dict]]:
    """(id suffix, manifest row) of each case of one entry; the caller puts the entry's number before the suffix."""
    if fmt == "ct-rate":
        return [("", {"images": [_ct_rate_volume(_text(entry["VolumeName"]), images_dir)], "task": "report",
                      "reference": _report(entry["Findings_EN"], entry["Impressions_EN"]),
                      "volume": _text(entry["VolumeName"])})]
    if fmt == "radfm-vqa":
        image = str(Path(_text(entry["img_root_dir"])) / _text(entry["Figure_path"]))
        return [("", {"images": _images(image, where), "task": "vqa", "question": _text(entry["Question"]),
                      "reference": _text(entry["Answer"])})]
    if fmt == "radfm-caption":
        images = _images(_text(entry["npy_path"]), where)
        context = " ".join(p for p in (_text(entry.get("pat")), _text(entry.get("pre"))) if p)
        title = {"title": _text(entry["title"])} if _text(entry.get("title")) else {}
        rows = [("-report", {"images": images, "task": "report",
                             "reference": _report(entry["finding"], entry["impression"]), **title,
                             **({"question": f"{context} {TEMPLATES['report'][0]}"} if context else {})})]
        if _text(entry.get("radiographic_features")):
            rows.append(("-rationale", {"images": images, "task": "rationale",
                                        "reference": _text(entry["radiographic_features"]), **title,
                                        **({"question": f"{context} {TEMPLATES['rationale'][0]}"} if context else {})}))
        return rows
    images = _images(_text(entry["image_path"]), where)
    if fmt == "radfm-yes-no":
        label = _text(entry["label"])
        reference = {"1": "yes", "0": "no", "1.0": "yes", "0.0": "no"}.get(label, label)
        return [("", {"images": images, "task": "diagnosis", "question": _text(entry["disease"]),
                      "reference": reference})]
    if fmt == "radfm-diagnosis":
        return [("", {"images": images, "task": "vqa", "question": OPEN_DIAGNOSIS, "reference": _text(entry["label"])})]
    if fmt == "radfm-vqa-3d":
        return [("", {"images": images, "task": "vqa", "question": _text(entry["question"]),
                      "reference": _text(entry["answer"])})]
    truth = _text(entry["answer"])  # radfm-modality
    rows = [("", {"images": images, "task": "modality", "reference": truth})]
    others = [m for m in modalities if m.lower() != truth.lower()]
    if others:
        other = others[zlib.crc32(_text(entry["image_path"]).encode()) % len(others)]  # fixed per scan, not random
        rows += [("-yes", {"images": images, "task": "vqa", "question": MODALITY_YES_NO.format(modality=truth),
                           "reference": "yes", "asked": truth}),
                 ("-no", {"images": images, "task": "vqa", "question": MODALITY_YES_NO.format(modality=other),
                          "reference": "no", "asked": other})]
    return rows


def _modality_set(path: "str | Path | None") -> list[str]:
    """The modalities of RadFM's ``modality_set.json`` (``{"modality": [...]}`` or a list/dict of names)."""
    if path is None:
        return []
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BenchmarkError(f"cannot read the modality set {path}: {exc}") from None
    data = data.get("modality", data) if isinstance(data, dict) else data
    names = sorted(map(str, data))
    if not names:
        raise BenchmarkError(f"{path} names no modality (RadFM's modality_set.json: {{\"modality\": [...]}})")
    return names


def benchmark_rows(path: "str | Path", modality_set: "str | Path | None" = None, rebase: tuple[str, str] | None = None,
                   images_dir: "str | Path | None" = None) -> tuple[list[dict], str]:
    """Manifest rows and the format's name. Ids are the entry's number (a CSV's line, a JSON list's 1-based
    position, also kept as ``source_row``), with ``-yes``/``-no``/``-report``/``-rationale`` where an entry
    gives several cases; images are absolute paths (relative ones are under the file's folder).

    ``modality_set``: RadFM's ``modality_set.json``, for the yes/no pair of each modality row.
    ``rebase``: (old prefix, new prefix) of image paths (RadFM's files name paths on its authors' disks).
    ``images_dir``: where CT-RATE's volumes are (flat, or its release's folders; default the file's folder).
    """
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark file not found: {path}")
    entries, fmt = _read(path)
    modalities = _modality_set(modality_set)
    rows, where = [], (path.parent.absolute(), rebase)
    first = 1 if path.suffix.lower() == ".json" else 2  # a CSV's first entry is on the line after its header
    for number, entry in enumerate(entries, first):
        for suffix, case in _cases(entry, fmt, modalities, where, Path(images_dir or path.parent).absolute()):
            rows.append({"id": f"{number}{suffix}", **case, "source_row": number, "benchmark": fmt})
    return rows, fmt


def write_manifest(rows: list[dict], out: "str | Path") -> Path:
    """``out`` as JSON lines, one row a line, written whole (a folder, a full disk: one line, no cut file)."""
    out = Path(out)
    storage.check_writable(out.parent, "the manifest's folder", folder=True)  # made if missing
    storage.write_text(out, "".join(json.dumps(row) + "\n" for row in rows))
    return out
