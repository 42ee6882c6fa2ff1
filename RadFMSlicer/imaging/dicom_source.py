"""Which DICOM instances a volume was read from, so a record of the answer can cite them.

A DICOM Structured Report joins its source study and references the exact instances the
model read; a volume read from DICOM therefore keeps the headers (no pixels) of its
instances. The record of an image (``ImageRecord.dicom``) keeps only their UIDs, their
files and the outline of what the model was shown in patient coordinates: patient identity
stays in the DICOM files, and :func:`headers_for` reads it back from there when a report
is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ..errors import ImageError
from .geometry import LPS_TO_RAS


@dataclass(frozen=True)
class DicomSource:
    """The headers (read without pixel data) of the instances a volume was read from, and their files."""

    headers: tuple
    files: tuple

    @property
    def first(self) -> pydicom.Dataset:
        return self.headers[0]

    def record(self, display_to_ras: np.ndarray, shape: tuple) -> dict:
        """What a session keeps: study/series/frame-of-reference UIDs, the instances, and the
        corners (LPS mm, voxel centres) of the first and last slice of the volume as shown."""
        s, r, c = shape
        outline = []
        for k in (0, s - 1):
            face = [(k, 0, 0), (k, 0, c - 1), (k, r - 1, c - 1), (k, r - 1, 0)]
            points = (LPS_TO_RAS @ display_to_ras @ np.array([[*p, 1.0] for p in face]).T)[:3].T
            outline.append([[float(v) for v in p] for p in points])
        return {
            "study_instance_uid": str(self.first.StudyInstanceUID),
            "series_instance_uid": str(self.first.SeriesInstanceUID),
            "frame_of_reference_uid": str(self.first.get("FrameOfReferenceUID", "")) or None,
            "instances": [[str(h.SOPClassUID), str(h.SOPInstanceUID)] for h in self.headers],
            "files": list(self.files),
            "outline_lps": outline,
        }


def _citable(header) -> bool:
    return header is not None and "SOPInstanceUID" in header and "StudyInstanceUID" in header


def read_header(path) -> pydicom.Dataset | None:
    """A DICOM file's header without its pixel data; None for a file that is not DICOM."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, TypeError):
        return None
    return header if _citable(header) else None


def read_source(files, headers=None) -> DicomSource:
    """The headers of the files a DICOM volume was read from (SimpleITK read their pixels already).

    ``headers``: those the reader's checks already read, in the order of ``files`` (each file's
    header is then read once); else they are read here.
    """
    headers = list(headers) if headers else [read_header(path) for path in files]
    for path, header in zip(files, headers):
        if not _citable(header):
            raise ImageError(f"{path} was read as DICOM but its header lacks the SOP/study UIDs a record needs.")
    return DicomSource(tuple(headers), tuple(os.path.abspath(f) for f in files))  # a session outlives the cwd


def headers_for(files, instance_uids) -> list:
    """The headers of the instances ``instance_uids`` read from ``files``, in that order.

    A record of an answer reads patient and study identity from here, at the time it is
    written, rather than from a session file.
    """
    found = {h.SOPInstanceUID: h for h in map(read_header, files) if h is not None}
    missing = [uid for uid in instance_uids if uid not in found]
    if missing:
        raise ImageError(f"{len(missing)} of the {len(instance_uids)} DICOM instances the model read are no longer "
                         f"in their files (e.g. {missing[0]}, once in {os.path.dirname(files[0])}): the report "
                         "needs the series as it was read")
    return [found[uid] for uid in instance_uids]


def headers_in(source) -> list:
    """The headers of every DICOM file at ``source`` (a file or a folder, searched through)."""
    source = os.fspath(source)
    paths = [source] if os.path.isfile(source) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(source) for name in names)
    return [h for h in map(read_header, paths) if h is not None]
