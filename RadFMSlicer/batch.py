"""Batch runs over many scans into a resumable JSON-lines results file.

``radfm batch`` and evaluation runs share this: the scans to answer (:func:`batch_items`),
which are already answered (:func:`finished_ids`), and how a record is appended so that a
crash loses at most the line being written (:func:`append_record`).
"""

import csv
import json
import os
from pathlib import Path

from .errors import RadFMError

SCAN_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".png", ".jpg", ".jpeg")


def batch_items(source: Path) -> list[dict]:
    """Scans to answer: every scan file or DICOM folder in a folder, or the rows of a CSV.

    CSV columns: ``image`` (required), optional ``id``, ``question``, ``task``, ``prior``.
    """
    if source.is_file() and source.suffix.lower() == ".csv":
        with open(source, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and "image" not in rows[0]:
            raise RadFMError(f"{source} needs an 'image' column (found: {', '.join(rows[0])})")
        base = source.parent
        items = []
        for row in rows:
            images = [str(base / row["image"])] + ([str(base / row["prior"])] if row.get("prior") else [])
            items.append({"id": row.get("id") or row["image"], "images": images,
                          "question": row.get("question") or None, "task": row.get("task") or None})
        return items
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


def finished_ids(out: Path) -> set[str]:
    """Ids already answered in ``out``; failed ones are retried, a torn last line is cut off."""
    done = set()
    if out.exists():
        data = out.read_bytes()
        if data and not data.endswith(b"\n"):  # interrupted mid-write
            out.write_bytes(data[: data.rfind(b"\n") + 1])
        for line in out.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "answer" in record:
                done.add(record["id"])
    return done


def append_record(f, record: dict) -> None:
    """One JSON line, flushed and fsynced: a crash loses at most the line being written."""
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())
