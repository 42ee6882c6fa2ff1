"""Batch runs over many scans into a resumable JSON-lines results file.

``radfm batch`` and evaluation runs share this: the scans to answer (:func:`batch_items`),
which are already answered (:func:`finished_ids`), and how a record is appended so that a
crash loses at most the line being written (:func:`append_record`).
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import storage
from .errors import RadFMError
from .tables import csv_rows

SCAN_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".png", ".jpg", ".jpeg")
_BLOCK = 1 << 16  # bytes read at a time when looking back for the last newline


def batch_items(source: Path) -> list[dict]:
    """Scans to answer: every scan file or DICOM folder in a folder, or the rows of a CSV.

    CSV columns: ``image`` (required), optional ``id``, ``question``, ``task``, ``prior``.
    """
    if source.is_file() and source.suffix.lower() == ".csv":
        header, rows = csv_rows(source)
        if rows and "image" not in header:
            raise RadFMError(f"{source} needs an 'image' column (found: {', '.join(header)})")
        base = source.parent
        items, seen = [], {}
        for line, row in rows:
            if isinstance(row, str):
                raise RadFMError(f"{source} line {line}: {row}")
            if not (row.get("image") or "").strip():
                raise RadFMError(f"{source} line {line}: the 'image' cell is empty")
            images = [str(base / row["image"])] + ([str(base / row["prior"])] if row.get("prior") else [])
            key = row.get("id") or row["image"]
            if key in seen:
                raise RadFMError(f"{source} line {line}: id {key!r} repeats line {seen[key]}; "
                                 "each scan needs its own id (one result per id)")
            seen[key] = line
            items.append({"id": key, "images": images,
                          "question": row.get("question") or None, "task": row.get("task") or None})
        return items
    if source.is_file():
        raise RadFMError(f"batch input {source} is a file: give a folder of scans or a CSV file (.csv)")
    if not source.is_dir():
        raise RadFMError(f"batch input not found: {source} (give a folder of scans or a CSV file)")
    items = []
    for entry in sorted(source.iterdir()):
        is_scan = entry.is_file() and entry.name.lower().endswith(SCAN_SUFFIXES)
        if is_scan or (entry.is_dir() and any(entry.iterdir())):
            items.append({"id": entry.name, "images": [str(entry)], "question": None, "task": None})
    if not items:
        raise RadFMError(f"no scans found in {source} (looked for {', '.join(SCAN_SUFFIXES)} and DICOM folders)")
    return items


def finished_ids(out: Path, settings: dict | None = None, force: bool = False, partial: bool = False) -> set[str]:
    """Ids already answered in ``out`` (repaired first, see :func:`repair`); failed ones are retried.

    ``settings``: what this run answers with (stored in each record as ``run_settings``).
    Resuming a file made with other settings is refused, naming what differs, unless
    ``force``: a results file otherwise silently mixes answers made in different ways.
    ``partial``: ``settings`` holds only what is known so far (before a model is loaded, so a
    refused resume costs no load): the records' other settings are not compared.
    """
    try:
        index = repair(out)
    except OSError as exc:
        raise RadFMError(f"cannot read or repair the results file {out}: {exc.strerror or exc}") from None
    settings = None if settings is None else json.loads(json.dumps(settings))  # as records store it
    if settings is not None and not force:
        stored = (r.settings for r in index.values() if r.settings is not None)
        if partial:
            stored = ({key: s.get(key) for key in settings} for s in stored)
        made_with = next((s for s in stored if s != settings), None)
        if made_with is not None:
            changed = "; ".join(f"{key}: {made_with.get(key)!r} -> {settings.get(key)!r}"
                                for key in sorted(set(made_with) | set(settings)) if made_with.get(key) != settings.get(key))
            raise RadFMError(f"{out} holds answers made with other settings ({changed}): write to another file, "
                             f"or add --force to resume it with the new settings (each record keeps its own)")
    return {key for key, r in index.items() if r.answered}


@dataclass
class _Line:
    """Where one record sat in a results file as read, and what resuming needs to know of it."""

    offset: int
    length: int
    answered: bool
    settings: dict | None


def repair(out: Path) -> dict:
    """Make ``out`` valid JSON lines with one record per id (the latest); return its index.

    A kill mid-write leaves a torn last line: it is cut off by truncating the file at its
    last newline, so nothing before it is rewritten. Lines that are not records (a torn
    line, a corrupt one in the middle) are kept aside in ``<out>.rejected``. When the file
    holds such lines or older records of a retried id, it is replaced by the cleaned copy
    atomically (new file, fsync, rename): a kill at any moment leaves the old file or the
    new one, never less.
    """
    out = Path(out)
    if not out.exists():
        return {}
    end = _end_of_last_line(out)
    with open(out, "rb+") as f:
        f.seek(end)
        torn = f.read()
        if torn:
            _set_aside(out, [torn])  # first kept aside, then cut: a kill in between loses nothing
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    index, count, rejected = {}, 0, []
    with open(out, "rb") as f:
        offset = 0
        for line in f:
            count += 1
            record = _parse(line)
            if record is None:
                rejected.append(line)
            else:
                index.pop(record["id"], None)  # re-inserted: the dict keeps file order of latest records
                index[record["id"]] = _Line(offset, len(line), "answer" in record, record.get("run_settings"))
            offset += len(line)
    _set_aside(out, rejected)
    if len(index) < count:
        with open(out, "rb") as f:
            kept = []
            for line in index.values():
                f.seek(line.offset)
                kept.append(f.read(line.length))
        storage.write_bytes(out, b"".join(kept))
    return index


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("id"), (str, int)) and line.endswith(b"\n")
    return record if ok else None


def _end_of_last_line(out: Path) -> int:
    """The offset just after the last newline of ``out`` (0 if it has none)."""
    with open(out, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - _BLOCK)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            end = start
    return 0


def _set_aside(out: Path, lines: list[bytes]) -> None:
    """Append unusable lines to ``<out>.rejected`` (for a look, never lost)."""
    lines = [line for line in lines if line.strip()]
    if lines:
        with open(out.with_name(out.name + ".rejected"), "ab") as f:
            f.write(b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())


def append_record(f, record: dict) -> None:
    """One JSON line, flushed and fsynced: a crash loses at most the line being written.

    A failed write (full disk, file-size limit) is an error saying the records before it
    are kept; the torn line it may leave is cut off when the run resumes.
    """
    data = (json.dumps(record) + "\n").encode("utf-8")
    try:  # straight to the file, not through ``f``'s buffer: a failed write leaves nothing for close to retry
        while data:
            data = data[os.write(f.fileno(), data):]
        os.fsync(f.fileno())
    except OSError as exc:
        raise RadFMError(f"could not add the result of {record.get('id')!r} to {f.name} ({exc.strerror or exc}); "
                         "the results before it are kept: free space and rerun to resume") from None
