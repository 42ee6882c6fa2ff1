"""Arrays in memory and scan files (SimpleITK: NIfTI, NRRD, MHA, DICOM, PNG/JPEG) -> :class:`Volume`."""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk

from ..errors import ImageError
from .geometry import LPS_TO_RAS, Grid, Volume, affine_from_itk, build_volume, check_size

SUPPORTED = "NIfTI (.nii/.nii.gz), NRRD, MHA/MHD, a DICOM file or series folder, PNG or JPEG"


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
    return build_volume(a, m, name, modality, notes)


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
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1].replace("sitk::ERROR: ", "")
        raise ImageError(f"Cannot read {path} ({reason}); supported: {SUPPORTED}.") from None
    return reader


def _dicom_series(folder):
    """All DICOM series under ``folder``: list of (uid, files, description)."""
    found = []
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on every folder without DICOM
    try:
        for root, _, files in sorted(os.walk(folder)):
            if not files:
                continue
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(root):
                names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(root, uid)
                found.append((uid, list(names), _meta(read_info(names[0]), "0008|103e")))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    return found


def _pick_series(folder, series):
    found = _dicom_series(folder)
    if not found:
        raise ImageError(f"No DICOM series found in folder {folder}; "
                         f"point to a series folder or an image file ({SUPPORTED}).")
    listing = "; ".join(f"'{d or '(no description)'}' {len(f)} slices [{u}]" for u, f, d in found[:10])
    if series is not None:
        key = str(series).strip().lower()
        matches = [s for s in found if s[0] == str(series).strip() or (s[2] or "").lower() == key]
        if not matches:
            raise ImageError(f"No DICOM series '{series}' in {folder}; available: {listing}.")
        found = matches
    uid, files, desc = max(found, key=lambda s: len(s[1]))
    notes = [f"picked DICOM series '{desc or uid}' ({len(files)} slices) of: {listing}"] if len(found) > 1 else []
    return files, notes


def load_volume(path, series=None) -> Volume:
    """Read a scan file or DICOM folder (``series``: UID or description to pick one)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageError(f"Scan not found: {path}")
    notes = []
    if os.path.isdir(path):
        files, notes = _pick_series(path, series)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        info = read_info(files[0])
    else:
        if series is not None:
            raise ImageError(f"series='{series}' only applies to a DICOM folder, but {path} is a single file.")
        reader = info = read_info(path)
        size = info.GetSize()
        if len(size) > 3 and any(n != 1 for n in size[3:]):
            raise ImageError(_not_3d(path, size[::-1]))
        if len(size) <= 3:  # refuse absurd sizes before reading the pixels
            shape = (size[2] if len(size) == 3 else 1, size[1], size[0])
            check_size(Grid.plan(shape, affine_from_itk(size, info.GetSpacing(), info.GetOrigin(),
                                                 info.GetDirection())).display_shape, path)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise ImageError(f"Cannot read the pixels of {path} ({str(e).strip().splitlines()[-1]}).") from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() not in (2, 3):
        raise ImageError(_not_3d(path, image.GetSize()[::-1]))
    a = sitk.GetArrayViewFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        a = _to_gray(a, notes)
    m = affine_from_itk(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return build_volume(a, m, path, _meta(info, "0008|0060"), notes)
