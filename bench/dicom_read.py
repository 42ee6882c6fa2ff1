"""Reading a DICOM series: what the header checks (``imaging/dicom_checks.py``) add to it.

A series of 512 x 512 int16 slices (300; 60 with --quick) is written from pydicom's
CT_small.dcm header. ``load_volume`` on its folder (pydicom reads every header, then
SimpleITK the pixels) is compared with the same read whose series check is switched
off (the files passed through unread): the baseline.
"""

import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from RadFMSlicer.imaging import io, load_volume

from .common import Result, compare, memory_fields


def write_series(folder: Path, slices: int) -> Path:
    uid, rng = generate_uid(), np.random.default_rng(0)
    for k in range(slices):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.Rows = ds.Columns = 512
        ds.PixelData = rng.integers(0, 2000, (512, 512)).astype(np.int16).tobytes()
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = uid, generate_uid(), k + 1
        ds.ImagePositionPatient = [-50.0, -50.0, float(k)]
        ds.save_as(folder / f"slice{k:03d}.dcm")
    return folder


def _unchecked(folder):
    with mock.patch.object(io, "check_series", lambda path, files: (files, [], [])):
        return load_volume(folder)


def run(recorder, quick: bool) -> None:
    slices = 60 if quick else 300
    with tempfile.TemporaryDirectory(prefix="radfm-bench-dicom-") as work:
        folder = write_series(Path(work), slices)
        calls = {"unchecked: the pixels only": lambda: _unchecked(folder),
                 "ours: every header checked first": lambda: load_volume(folder)}
        for name, (seconds, peak, extra) in compare(calls, repeats=3).items():
            recorder.add(Result("dicom", f"load_volume, a {slices}-slice 512x512 DICOM series", name,
                                {"slices": slices}, seconds, name.startswith("unchecked"),
                                memory_fields(peak, extra)))
