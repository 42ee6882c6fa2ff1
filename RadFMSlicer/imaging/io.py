"""Arrays in memory and scan files (SimpleITK: NIfTI, NRRD, MHA, DICOM, PNG/JPEG) -> :class:`Volume`."""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import re
import struct
import sys
import tempfile
import threading
import zlib
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk

from ..errors import ImageError
from ..paths import split_npy_index
from .dicom_checks import (check_instance, check_series, has_pixel_size, in_scanner_units, read_header,
                           rescale_text)
from .dicom_source import read_source
from .geometry import LPS_TO_RAS, Grid, Volume, affine_from_itk, build_volume, check_size
from .nifti_checks import nifti_geometry_notes, nifti_header, nifti_rescale
from .windows import resolve_window

SUPPORTED = ("NIfTI (.nii/.nii.gz), NRRD, MHA/MHD, a DICOM file or series folder, PNG or JPEG, "
             "RadFM's own .npy volumes")


def _to_gray(a: np.ndarray, notes: list) -> np.ndarray:
    """Last axis = colour components (RGB/RGBA or gray+alpha) -> luminance."""
    if a.shape[-1] == 1:
        return a[..., 0]
    notes.append(f"{a.shape[-1]}-component colour image converted to gray")
    if a.shape[-1] in (3, 4):
        return a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return a[..., 0]


def volume_from_array(array_kji, ijk_to_ras=None, *, ijk_to_lps=None, name="array", modality=None) -> Volume:
    """An in-memory array (Slicer's ``arrayFromVolume``: ``[k, j, i]``) plus its 4x4 geometry.

    Without a matrix the array is taken as already in display order with 1 mm voxels.
    """
    if ijk_to_ras is not None and ijk_to_lps is not None:
        raise ImageError(f"{name}: give ijk_to_ras or ijk_to_lps, not both.")
    notes = []
    given = ijk_to_ras if ijk_to_ras is not None else ijk_to_lps
    if given is not None:
        m = np.asarray(given, dtype=float)
        if m.shape != (4, 4):
            raise ImageError(f"{name}: the IJK->RAS/LPS matrix must be 4x4 (got shape {m.shape}).")
        if ijk_to_ras is not None:
            m = LPS_TO_RAS @ m
    else:
        m = np.diag([1.0, 1.0, -1.0, 1.0])  # i: R->L, j: A->P, k: S->I, i.e. display order
        notes.append("no geometry given: array taken as already in display order, 1 mm voxels")
    a = np.asarray(array_kji)
    if a.ndim == 4 and (a.shape[-1] == 1 or (a.dtype == np.uint8 and a.shape[-1] in (3, 4))):
        a = _to_gray(a, notes)
    if a.ndim not in (2, 3):
        raise ImageError(_not_3d(name, a.shape))
    return build_volume(a, m, name, modality, notes, size_known=given is not None)


def _not_3d(source, shape) -> str:
    return (f"{source} is a {len(shape)}D image of shape {tuple(shape)}; RadFM takes one 2D/3D image: "
            "extract the volume you want first (e.g. SimpleITK: sitk.WriteImage(img[:, :, :, t], 'vol.nii.gz')).")


def _meta(reader, key):
    """A DICOM tag such as "0008|0060" (modality), or None when absent/blank."""
    if not reader.HasMetaDataKey(key):
        return None
    return reader.GetMetaData(key).strip() or None


def read_info(path):
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    messages = []  # what the readers tried print to stdout/stderr while probing the file
    try:
        with _reader_messages(messages):
            reader.ReadImageInformation()
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1].replace("sitk::ERROR: ", "")
        if _TRUNCATED.search("; ".join(messages)):
            raise ImageError(f"{path} is truncated: {'; '.join(messages)}; copy or export the file again.") from None
        raise ImageError(f"Cannot read {path} ({reason}): not a supported image, or a damaged one; "
                         f"supported: {SUPPORTED}.") from None
    return reader


class _Series(NamedTuple):
    """One DICOM series in a folder, with what tells it apart from the others there."""

    uid: str
    files: list
    description: str | None
    modality: str | None
    number: str | None
    size: tuple  # (columns, rows) of its first slice

    @property
    def label(self) -> str:
        """E.g. "CT series 2 'axial A', 6 slices of 512x512 [1.2.840...]" (the UID picks it with --series)."""
        name = f"{self.modality or 'unknown modality'} series" + (f" {self.number}" if self.number else "")
        if self.description:
            name += f" '{self.description}'"
        n = len(self.files)
        return f"{name}, {n} slice{'s' if n != 1 else ''} of {self.size[0]}x{self.size[1]} [{self.uid}]"


def _dicom_series(folder) -> "list[_Series]":
    """All DICOM series under ``folder``."""
    found = []
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on every folder without DICOM
    try:
        for root, _, files in sorted(os.walk(folder)):
            if not files:
                continue
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(root):
                names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(root, uid)
                info = read_info(names[0])
                found.append(_Series(uid, list(names), _meta(info, "0008|103e"), _meta(info, "0008|0060"),
                                     _meta(info, "0020|0011"), tuple(info.GetSize()[:2])))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    return found


def _pick_series(folder, series):
    found = _dicom_series(folder)
    if not found:
        raise ImageError(f"No DICOM series found in folder {folder}; "
                         f"point to a series folder or an image file ({SUPPORTED}).")
    listing = "; ".join(s.label for s in found[:10]) + (f"; and {len(found) - 10} more" if len(found) > 10 else "")
    if series is not None:
        key = str(series).strip().lower()
        matches = [s for s in found if s.uid == str(series).strip() or (s.description or "").lower() == key]
        if not matches:
            raise ImageError(f"No DICOM series '{series}' in {folder} (give its UID or description); "
                             f"available: {listing}.")
        found = matches
    picked = max(found, key=lambda s: len(s.files))
    notes = [f"picked {picked.label} (most slices; pick another by its UID or description) "
             f"of {len(found)} DICOM series: {listing}"] if len(found) > 1 else []
    return picked.files, notes


# NIfTI-1 / NIfTI-2 header fields: (dim int[8], bitpix, vox_offset) as (offset, struct code).
_NIFTI_LAYOUTS = {348: ((40, "8h"), (72, "h"), (108, "f")), 540: ((16, "8q"), (14, "h"), (168, "q"))}
_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # datatype codes whose voxels can be NaN/inf
_CHUNK = 1 << 24


def _nifti_nonfinite(path: str) -> "np.ndarray | None":
    """Check a NIfTI file holds every voxel its header declares; flag its NaN/inf voxels.

    SimpleITK neither notices a truncated NIfTI (missing voxels come back as noise or 0)
    nor keeps NaN (it reads them as 0), so the raw voxel bytes are checked here. Returns
    a flat (file order = ``[k, j, i]`` C order) mask of non-finite voxels, or None if none.
    """
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(540)
            for endian in "<>":
                layout = _NIFTI_LAYOUTS.get(struct.unpack(endian + "i", header[:4])[0])
                if layout:
                    break
            else:
                return None  # not a NIfTI header: SimpleITK will say so
            (o_dim, c_dim), (o_bits, c_bits), (o_off, c_off) = layout
            dim = struct.unpack_from(endian + c_dim, header, o_dim)
            bits = struct.unpack_from(endian + c_bits, header, o_bits)[0]
            datatype = struct.unpack_from(endian + "h", header, 70 if layout is _NIFTI_LAYOUTS[348] else 12)[0]
            n_voxels = math.prod(max(1, d) for d in dim[1:1 + min(max(dim[0], 1), 7)])
            expected = n_voxels * bits // 8
            offset = int(struct.unpack_from(endian + c_off, header, o_off)[0])
            dtype = np.dtype(_NIFTI_FLOATS[datatype]).newbyteorder(endian) if datatype in _NIFTI_FLOATS else None
            held, flagged = 0, None
            if dtype is None:  # integer voxels hold no NaN: only their amount needs checking, not their values
                if opener is open:
                    held = max(0, min(expected, os.path.getsize(path) - offset))
                elif _gzip_size(path) == (offset + expected) % 2**32:
                    return None  # the gzip trailer holds the whole uncompressed size: complete
            f.seek(offset + held)
            while held < expected:
                chunk = f.read(min(_CHUNK, expected - held))
                if not chunk:
                    break
                if dtype is not None:
                    bad = ~np.isfinite(np.frombuffer(chunk[: len(chunk) - len(chunk) % dtype.itemsize], dtype))
                    if bad.any():
                        flagged = np.zeros(n_voxels, bool) if flagged is None else flagged
                        start = held // dtype.itemsize
                        flagged[start:start + bad.size] = bad
                held += len(chunk)
    except EOFError as e:
        raise ImageError(f"{path} is truncated ({e}): copy or export the file again.") from None
    except (zlib.error, gzip.BadGzipFile) as e:
        raise ImageError(f"{path} is corrupt ({e}): copy or export the file again.") from None
    if held < expected:
        raise ImageError(f"{path} is truncated: its header declares {expected:,} bytes of voxels but the file "
                         f"holds {held:,}; copy or export the file again.")
    return flagged


def _gzip_size(path: str) -> int:
    """The uncompressed size (mod 2**32) a gzip file's trailer records (for a cut file: noise)."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


_CAPTURE_LOCK = threading.Lock()


@contextlib.contextmanager
def _reader_messages(into: list):
    """Collect what ITK, GDCM, MetaIO and libjpeg print straight to the process's fds 1 and 2.

    Their warnings belong in the image's notes (and their details in an error message),
    not as raw lines on the terminal, in ``--json`` output (libjpeg writes to stdout) or
    in the worker's event stream. Other text is passed on where it was going.
    """
    captured = []
    with _CAPTURE_LOCK, contextlib.ExitStack() as stack:  # fds are process-wide: one capture at a time
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            with contextlib.suppress(OSError, ValueError):  # a closed or broken stream is not ours to report
                stream.flush()
            tmp = stack.enter_context(tempfile.TemporaryFile())
            saved = os.dup(fd)
            os.dup2(tmp.fileno(), fd)
            captured.append((fd, saved, tmp, stream))
        try:
            yield
        finally:
            for fd, saved, tmp, stream in captured:
                os.dup2(saved, fd)
                os.close(saved)
                tmp.seek(0)
                messages = [m for m in _READER_SPLIT.split(tmp.read().decode("utf-8", "replace")) if m.strip()]
                into.extend(" ".join(_READER_PREFIX.sub("", m).split()) for m in messages if _READER_LINE.search(m))
                rest = "".join(m for m in messages if not _READER_LINE.search(m))
                if rest.strip():
                    with contextlib.suppress(OSError, ValueError):
                        stream.write(rest)


_READER_SPLIT = re.compile(r"(?m)^(?=WARNING: |ERROR: |MetaImage: |Premature end of JPEG|Corrupt JPEG)")
_READER_LINE = re.compile(r"^(WARNING: In |ERROR: In |MetaImage: |\w+ \(0x[0-9a-f]+\): |Premature end|Corrupt JPEG)")
_READER_PREFIX = re.compile(r"(?s)^(WARNING|ERROR): In \S+, line \d+\s*|\w+ \(0x[0-9a-f]+\): ")
_TRUNCATED = re.compile(r"not read completely|got only|but received|ended before|truncat|premature", re.I)


def _explain(message: str) -> str:
    """A reader warning as a note a reader of the answer understands."""
    uneven = re.search(r"Non uniform sampling.*?nonuniformity:\s*([\d.eE+-]+)", message)
    if uneven:
        return (f"slices unevenly spaced or not parallel (up to {float(uneven.group(1)):.3g} mm off: a radial, "
                "localizer or incomplete series?): stacked as one volume anyway, so distances across slices "
                "are approximate")
    return f"reader warning: {message}"


def read_pixels(reader, path: str, notes: list | None = None) -> "tuple[sitk.Image, np.ndarray | None]":
    """Run a reader whose information was read: the image, and its NaN/inf mask (NIfTI only).

    The reader's warnings go to ``notes``; a file that holds less than its header declares
    is refused as truncated.
    """
    nonfinite = _nifti_nonfinite(path) if path.lower().endswith((".nii", ".nii.gz")) else None
    messages = []
    try:
        with _reader_messages(messages):
            image = reader.Execute()
    except RuntimeError as e:
        # MetaIO's own lines say what happened; the exception then adds a stale errno ("No such file").
        detail = "; ".join(messages) or str(e).strip().splitlines()[-1].replace("sitk::ERROR: ", "")
        problem = "is truncated" if _TRUNCATED.search(detail) else "is truncated or damaged (its header reads, its pixels do not)"
        raise ImageError(f"{path} {problem}: {detail}; copy or export the file again.") from None
    cut = [m for m in messages if _TRUNCATED.search(m)]  # libjpeg reads a cut file, filling the rest
    if cut:
        raise ImageError(f"{path} is truncated: {'; '.join(cut)}; copy or export the file again.")
    if notes is not None:
        notes.extend(_explain(m) for m in messages)
    return image, nonfinite


_NO_SIZE_READERS = ("PNGImageIO", "JPEGImageIO", "BMPImageIO", "TIFFImageIO")  # pictures: no size in mm
FAR_VALUES = 1e6  # no scanner's units reach this (CT: -1024..~3000 HU; MR, PET: well below)


def _far_values_notes(low: float, high: float, rescale: str) -> list:
    """A note when the header's rescale takes values far beyond any scanner's units (an all-white image)."""
    if max(abs(low), abs(high)) < FAR_VALUES:
        return []
    return [f"values run from {low:.3g} to {high:.3g} after the header's {rescale}: far beyond any scanner's "
            "units (CT: about -1024 to 3000 HU); the rescale in the header is likely wrong, and the image may "
            "show all white or black"]


def load_radfm_npy(path: str, index=None) -> Volume:
    """One image of a RadFM ``.npy`` (its test sets ship volumes so): ``[n, 3, H, W, D]``, ``[3, H, W, D]``,
    ``[H, W, D]`` or a 2D ``[H, W]``/``[H, W, 3]`` picture; ``index`` picks one of the ``n`` images.

    RadFM's loaders stack the images of a case on the first axis, repeat the gray image on three
    channels (channel 0 is read) and keep slices on the last axis, in the file's own intensities
    (they rescale min-max when loading; here the window does, automatic unless given). No geometry is
    stored: 1 mm voxels in display order.
    """
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ImageError(f"Cannot read {path} as a NumPy array ({exc}); RadFM's .npy volumes are plain arrays.") from None
    shape = a.shape
    if a.ndim == 5:
        if index is None and shape[0] != 1:
            raise ImageError(f"{path} holds {shape[0]} images (RadFM's [n, 3, H, W, D]): pick one as "
                             f"{path}#0 ... {path}#{shape[0] - 1}")
        index = 0 if index is None else int(index)
        if not 0 <= index < shape[0]:
            raise ImageError(f"{path} holds {shape[0]} images: #{index} is not one of them (0 to {shape[0] - 1})")
        a = a[index]
    elif index not in (None, 0, "0"):
        raise ImageError(f"{path} holds one image of shape {shape}: #{index} is not one of them")
    if a.ndim == 4:  # [C, H, W, D]: RadFM repeats the gray image on its channels
        a = a[0]
    if a.ndim == 3 and a.shape[-1] in (3, 4) and min(a.shape[:2]) > 4:  # [H, W, 3]: a colour picture
        return volume_from_array(np.asarray(a), name=path)
    if a.ndim == 3:
        a = np.moveaxis(a, -1, 0)  # [H, W, D] -> [k, j, i]: slices on the last axis
    elif a.ndim != 2:
        raise ImageError(f"{path} is an array of shape {shape}; RadFM's .npy volumes are "
                         "[n, 3, H, W, D], [3, H, W, D], [H, W, D] or a 2D picture")
    if not np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_:
        raise ImageError(f"{path} holds {a.dtype} values, not intensities")
    volume = volume_from_array(np.ascontiguousarray(a), name=f"{path}#{index}" if len(shape) == 5 else path)
    volume.notes.append(f"RadFM .npy of shape {tuple(shape)}")
    return volume



def load_volume(path, series=None) -> Volume:
    """Read a scan file or DICOM folder (``series``: UID or description to pick one; for a RadFM
    ``.npy``, the index of its image, also spelled ``scan.npy#2``)."""
    path, index = split_npy_index(os.fspath(path))
    if not os.path.exists(path):
        raise ImageError(f"Scan not found: {path}")
    if path.lower().endswith(".npy"):
        return load_radfm_npy(path, index if index is not None else series)
    notes = []
    headers = []  # DICOM only: each file's header, checked before its pixels are read
    if os.path.isdir(path):
        files, notes = _pick_series(path, series)
        files, headers, more = check_series(path, files)
        notes += more
        dicom_files = files
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        info = read_info(files[0])
    else:
        if series is not None:
            raise ImageError(f"series='{series}' only applies to a DICOM folder, but {path} is a single file.")
        reader = info = read_info(path)
        if info.HasMetaDataKey("0028|0010"):  # DICOM (Rows): GDCM read the header
            headers = [read_header(path)]
            notes += check_instance(path, headers[0], _meta(info, "0008|0060"))
        dicom_files = [path] if _meta(info, "0008|0018") else None  # a SOP Instance UID: one DICOM file
        size = info.GetSize()
        if len(size) > 3 and any(n != 1 for n in size[3:]):
            raise ImageError(_not_3d(path, size))  # in the file's own (i, j, k, t) order, as nibabel shows it
        n = min(len(size), 3)
        if abs(np.linalg.det(np.reshape(info.GetDirection(), (len(size), len(size)))[:n, :n])) < 1e-6:
            raise ImageError(f"{path}: its direction matrix {tuple(round(v, 4) for v in info.GetDirection())} has "
                             "parallel or zero axes: its orientation cannot be known; fix the header or export the "
                             "scan again.")
        spacing = info.GetSpacing()[:3]
        if not all(math.isfinite(v) and v > 0 for v in spacing):  # MetaIO and NRRD keep a 0 (NIfTI: below)
            raise ImageError(f"{path}: its voxel size ({' x '.join(f'{v:g}' for v in spacing)} mm) is not a size: "
                             "no size in mm can be given; fix the header or export the scan again.")
        if len(size) <= 3:  # refuse absurd sizes before reading the pixels
            shape = (size[2] if len(size) == 3 else 1, size[1], size[0])
            check_size(Grid.plan(shape, affine_from_itk(size, info.GetSpacing(), info.GetOrigin(),
                                                 info.GetDirection())).display_shape, path)
    image, nonfinite = read_pixels(reader, path, notes)
    rescale = rescale_text(headers) if headers else None
    if path.lower().endswith((".nii", ".nii.gz")):
        header = nifti_header(path)
        notes += nifti_geometry_notes(path, header, image)
        rescale = nifti_rescale(header)
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() not in (2, 3):
        raise ImageError(_not_3d(path, image.GetSize()))
    a = sitk.GetArrayViewFromImage(image)
    if nonfinite is not None and nonfinite.size == a.size:  # put back the NaN/inf SimpleITK read as 0
        a = np.array(a, dtype=np.float32)
        a.reshape(-1)[nonfinite] = np.nan
    if image.GetNumberOfComponentsPerPixel() > 1:
        a = _to_gray(a, notes)
    if rescale and a.size:
        notes += _far_values_notes(float(np.nanmin(a)), float(np.nanmax(a)), rescale)
    m = affine_from_itk(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    size_known = (all(has_pixel_size(ds) for ds in headers) if headers
                  else sitk.ImageFileReader.GetImageIOFromFileName(path) not in _NO_SIZE_READERS)
    vol = build_volume(a, m, path, _meta(info, "0008|0060"), notes, size_known)
    if vol.modality == "CT" and not all(in_scanner_units(ds) for ds in headers):  # a Hounsfield window shows nothing
        vol.default_window = {**resolve_window(vol, "percentile"), "auto": "not Hounsfield units"}
    vol.dicom = read_source(dicom_files, headers or None) if dicom_files else None
    return vol
