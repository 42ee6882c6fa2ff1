"""Scan on disk or array in memory -> the exact tensor RadFM sees.

Display orientation (one convention for every input)
----------------------------------------------------
``Volume.voxels`` is a float32 array ``[slices, rows, cols]`` holding axial slices the way
a radiologist reads them:

* row 0 is ANTERIOR (anterior up), rows run anterior -> posterior;
* column 0 is patient RIGHT (patient right on the screen's left), cols run right -> left;
* slice 0 is the most SUPERIOR slice, slices run superior -> inferior.

Every 3D scan is brought to this layout by an axis permutation and flips only: each
voxel axis goes to the anatomical axis its direction cosine is closest to. Oblique
scans are therefore shown in the nearest axial orientation WITHOUT resampling (a note
gives the angle); ``Volume.display_to_ras`` (display index (slice, row, col) -> RAS mm)
keeps the exact geometry, so positions and sizes stay true.

A single-slice image (X-ray, PNG, one DICOM slice) keeps its own plane: the through-plane
axis becomes the (length 1) slice axis and the in-plane axes follow the usual reading
layout of that plane -- axial as above, coronal with superior up and patient right on
the left, sagittal with superior up and anterior on the left. A PNG/JPEG has no geometry
and is taken as drawn (top row up, left column = patient right, as X-rays are shown).

Model input
-----------
``preprocess`` windows to [0, 1], then resizes ``[rows, cols, slices]`` to 512 x 512 x D
with ``torch.nn.functional.interpolate`` (nearest by default, as RadFM training did),
D being the multiple of 4 closest to the slice count (4..64, ties to the smaller, like
RadFM's ``stack_images``), and repeats gray to 3 channels: ``[3, 512, 512, D]`` =
channel, rows (H), cols (W), slices (D), the per-image layout of RadFM's ``vision_x``.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch

from .errors import ImageError

MAX_SLICES = 2048
MAX_INPLANE = 4096
MAX_VOXELS = 2_000_000_000
MODEL_SIZE = 512
MAX_DEPTH = 64
PERCENTILES = (0.5, 99.5)
OBLIQUE_NOTE_DEG = 1.0
SUPPORTED = "NIfTI (.nii/.nii.gz), NRRD, MHA/MHD, a DICOM file or series folder, PNG or JPEG"

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse

# LPS unit vector followed by increasing (slice, row, col) index, per viewing plane.
_PLANES = {
    "axial": ((0, 0, -1), (0, 1, 0), (1, 0, 0)),  # S->I, A->P, R->L
    "coronal": ((0, 1, 0), (0, 0, -1), (1, 0, 0)),  # A->P, S->I, R->L
    "sagittal": ((1, 0, 0), (0, 0, -1), (0, 1, 0)),  # R->L, S->I, A->P
}
_PLANE_OF_NORMAL = {0: "sagittal", 1: "coronal", 2: "axial"}  # LPS axis closest to the normal


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Grid:
    """The original voxel grid (numpy ``[k, j, i]``) and how it maps to display order.

    ``axes[m]`` is the numpy axis of the original array shown as display axis m;
    ``flips[m]`` says whether it is reversed.
    """

    shape: tuple
    ijk_to_lps: np.ndarray
    axes: tuple
    flips: tuple
    oblique_deg: float

    @classmethod
    def plan(cls, shape_kji, ijk_to_lps) -> "Grid":
        """Pick the axis permutation/flips closest to the display convention."""
        m = np.asarray(ijk_to_lps, dtype=float)
        dirs = [m[:3, 2 - a] / np.linalg.norm(m[:3, 2 - a]) for a in range(3)]  # per numpy axis
        flat = [a for a in (0, 1, 2) if shape_kji[a] == 1]
        through = 0 if 0 in flat else flat[0] if len(flat) == 1 else None  # single-slice image
        plane = "axial" if through is None else _PLANE_OF_NORMAL[int(np.argmax(np.abs(dirs[through])))]
        targets = [np.array(t, dtype=float) for t in _PLANES[plane]]
        axes = max(itertools.permutations(range(3)),
                   key=lambda p: sum(abs(dirs[p[d]] @ targets[d]) for d in range(3)))
        dots = [dirs[axes[d]] @ targets[d] for d in range(3)]
        oblique = max(math.degrees(math.acos(min(1.0, abs(c)))) for c in dots)
        return cls(tuple(int(s) for s in shape_kji), m, tuple(axes),
                   tuple(bool(c < 0) for c in dots), oblique)

    @property
    def display_shape(self) -> tuple:
        return tuple(self.shape[a] for a in self.axes)

    @property
    def display_to_ijk(self) -> np.ndarray:
        """4x4: display index (slice, row, col) -> original index (i, j, k)."""
        t = np.zeros((4, 4))
        t[3, 3] = 1.0
        for d, (a, flip) in enumerate(zip(self.axes, self.flips)):
            t[2 - a, d] = -1.0 if flip else 1.0
            t[2 - a, 3] = self.shape[a] - 1 if flip else 0.0
        return t

    def reorient(self, array_kji: np.ndarray) -> np.ndarray:
        out = np.transpose(array_kji, self.axes)
        flipped = tuple(d for d in range(3) if self.flips[d])
        return np.flip(out, flipped) if flipped else out


def _affine(size, spacing, origin, direction) -> np.ndarray:
    """ITK geometry (LPS) -> 4x4 ijk->LPS; 2D images are embedded as one axial slice."""
    n = len(size)
    d = np.eye(3)
    d[:n, :n] = np.asarray(direction, dtype=float).reshape(n, n)
    sp = np.ones(3)
    sp[:n] = spacing
    o = np.zeros(3)
    o[:n] = origin
    a = np.eye(4)
    a[:3, :3] = d * sp
    a[:3, 3] = o
    return a


def _check_size(shape, source):
    s, r, c = shape
    if s > MAX_SLICES:
        problem = f"has {s} slices; the limit is {MAX_SLICES}"
    elif max(r, c) > MAX_INPLANE:
        problem = f"is {r}x{c} pixels in-plane; the limit is {MAX_INPLANE} per side"
    elif s * r * c > MAX_VOXELS:
        problem = f"has {s * r * c:,} voxels; the limit is {MAX_VOXELS:,}"
    else:
        return
    raise ImageError(f"{source} {problem}: crop or downsample it first.")


# --------------------------------------------------------------------------- volume
@dataclass
class Volume:
    """A scan in display orientation (see module docstring) with its geometry."""

    voxels: np.ndarray
    spacing_mm: tuple
    display_to_ras: np.ndarray
    source: str
    modality: str | None = None
    is_2d: bool = False
    notes: list = field(default_factory=list)
    crop_box: tuple | None = None  # ((s, r, c) min incl., (s, r, c) max excl.) in the full display grid
    default_window: dict | None = None  # crops inherit the parent's automatic window
    grid: Grid | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple:
        return tuple(self.voxels.shape)

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """4x4 of the ORIGINAL grid (the one masks and IJK boxes refer to)."""
        return LPS_TO_RAS @ self.grid.ijk_to_lps

    def to_display(self, array_kji) -> np.ndarray:
        """Reorient (and crop) an array on the original ``[k, j, i]`` grid like the voxels."""
        a = np.asarray(array_kji)
        if a.ndim == 2 and self.grid.shape[0] == 1:
            a = a[None]
        if a.shape != self.grid.shape:
            raise ImageError(f"Mask/array shape {a.shape} does not match the grid of {self.source} "
                             f"{self.grid.shape} (k, j, i): resample it onto the volume first.")
        out = self.grid.reorient(a)
        if self.crop_box is not None:
            (s0, r0, c0), (s1, r1, c1) = self.crop_box
            out = out[s0:s1, r0:r1, c0:c1]
        return np.ascontiguousarray(out)

    def crop(self, lo, hi, label: str) -> "Volume":
        """Sub-volume ``[lo, hi)`` in this volume's display index; keeps geometry and window."""
        lo, hi = np.asarray(lo, dtype=int), np.asarray(hi, dtype=int)
        shift = np.eye(4)
        shift[:3, 3] = lo
        base = np.zeros(3, dtype=int) if self.crop_box is None else np.asarray(self.crop_box[0])
        return Volume(
            voxels=np.ascontiguousarray(self.voxels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]),
            spacing_mm=self.spacing_mm,
            display_to_ras=self.display_to_ras @ shift,
            source=f"{self.source} [{label}]",
            modality=self.modality,
            is_2d=self.is_2d,
            notes=list(self.notes),
            crop_box=(tuple(int(v) for v in base + lo), tuple(int(v) for v in base + hi)),
            default_window=resolve_window(self, None),
            grid=self.grid,
        )


def _build_volume(array_kji, ijk_to_lps, source, modality=None, notes=()) -> Volume:
    """Validate, reorient and clean voxels: the single path every input goes through."""
    a = np.asarray(array_kji)
    if a.ndim == 2:
        a = a[None]
    if 0 in a.shape:
        raise ImageError(f"{source} is empty (shape {a.shape}): it needs at least one voxel along every axis.")
    if a.dtype.kind not in "biuf":
        raise ImageError(f"{source} has voxel type {a.dtype}; only real-valued (integer/float) images can be used.")
    m = np.asarray(ijk_to_lps, dtype=float)
    if m.shape != (4, 4) or not np.isfinite(m).all() or abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise ImageError(f"{source}: the IJK->RAS/LPS matrix must be a finite, invertible 4x4 matrix.")
    grid = Grid.plan(a.shape, m)
    _check_size(grid.display_shape, source)
    vox = np.array(grid.reorient(a), dtype=np.float32)  # always a copy
    notes = list(notes)
    finite = np.isfinite(vox)
    if not finite.all():
        if not finite.any():
            raise ImageError(f"{source} contains only NaN/inf values: there is no image to use.")
        low = float(vox[finite].min())
        vox[~finite] = low
        notes.append(f"{int((~finite).sum())} NaN/inf voxels set to the lowest finite value ({low:g})")
    lo, hi = float(vox.min()), float(vox.max())
    if lo == hi:
        raise ImageError(f"{source} has the same value ({lo:g}) in every voxel: nothing to see; check the file/series.")
    if grid.oblique_deg > OBLIQUE_NOTE_DEG:
        notes.append(f"oblique scan ({grid.oblique_deg:.1f} deg off the anatomical axes): shown in the "
                     "nearest standard orientation without resampling")
    d2r = LPS_TO_RAS @ m @ grid.display_to_ijk
    spacing = tuple(float(np.linalg.norm(d2r[:3, d])) for d in range(3))
    return Volume(vox, spacing, d2r, str(source), modality, vox.shape[0] == 1, notes, grid=grid)


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
    return _build_volume(a, m, name, modality, notes)


def _not_3d(source, shape) -> str:
    return (f"{source} is a {len(shape)}D image of shape {tuple(shape)}; RadFM takes one 2D/3D image: "
            "extract the volume you want first (e.g. SimpleITK: sitk.WriteImage(img[:, :, :, t], 'vol.nii.gz')).")


# --------------------------------------------------------------------------- files
def _meta(reader, key):
    """A DICOM tag such as "0008|0060" (modality), or None when absent/blank."""
    if not reader.HasMetaDataKey(key):
        return None
    return reader.GetMetaData(key).strip() or None


def _read_info(path):
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
                found.append((uid, list(names), _meta(_read_info(names[0]), "0008|103e")))
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
        info = _read_info(files[0])
    else:
        if series is not None:
            raise ImageError(f"series='{series}' only applies to a DICOM folder, but {path} is a single file.")
        reader = info = _read_info(path)
        size = info.GetSize()
        if len(size) > 3 and any(n != 1 for n in size[3:]):
            raise ImageError(_not_3d(path, size[::-1]))
        if len(size) <= 3:  # refuse absurd sizes before reading the pixels
            shape = (size[2] if len(size) == 3 else 1, size[1], size[0])
            _check_size(Grid.plan(shape, _affine(size, info.GetSpacing(), info.GetOrigin(),
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
    m = _affine(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return _build_volume(a, m, path, _meta(info, "0008|0060"), notes)


# --------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class Window:
    """Display window in the scan's units (HU for CT)."""

    center: float
    width: float

    def __post_init__(self):
        if not (math.isfinite(self.center) and math.isfinite(self.width)) or self.width <= 0:
            raise ImageError(f"Window width must be a number > 0 (got center={self.center}, width={self.width}); "
                             "e.g. Window(40, 400) for soft tissue.")

    @property
    def low(self) -> float:
        return self.center - self.width / 2

    @property
    def high(self) -> float:
        return self.center + self.width / 2


WINDOW_PRESETS = {
    "soft_tissue": Window(40, 400),
    "lung": Window(-600, 1500),
    "bone": Window(400, 1800),
    "brain": Window(40, 80),
}


def _window_dict(w: Window, preset=None, auto=None) -> dict:
    d = {"mode": "window", "preset": preset, "center": float(w.center), "width": float(w.width),
         "low": float(w.low), "high": float(w.high)}
    if auto:
        d["auto"] = auto
    return d


def _sample(vox: np.ndarray, limit=4_000_000) -> np.ndarray:
    """A regular subsample: percentiles of big volumes without sorting all voxels."""
    flat = vox.ravel()
    return flat[:: max(1, flat.size // limit)]


def _percentile_window(vol: Volume, auto=None) -> dict:
    sample = _sample(vol.voxels)
    low, high = (float(v) for v in np.percentile(sample, PERCENTILES))
    if high <= low:  # mostly one value (e.g. empty background): fall back to min-max
        low, high = float(sample.min()), float(sample.max())
    if high <= low:
        raise ImageError(f"{vol.source} has no contrast (all values {low:g}) for a percentile window; "
                         "use a fixed window such as 'soft_tissue'.")
    d = {"mode": "percentile", "percentiles": list(PERCENTILES), "low": low, "high": high}
    if auto:
        d["auto"] = auto
    return d


def _looks_like_ct(vol: Volume) -> bool:
    """Modality CT, or (no modality) values spanning air..bone in Hounsfield units."""
    if vol.modality:
        return vol.modality.upper() == "CT"
    low, high = np.percentile(_sample(vol.voxels), PERCENTILES)
    return -3100 <= low <= -500 and 0 <= high <= 4000


def resolve_window(vol: Volume, window=None) -> dict:
    """Turn any accepted window spelling into a description dict with absolute low/high.

    Accepted: None/"auto" (CT -> soft tissue, else percentile), a :class:`Window`, a preset
    name, "percentile", "center,width" text, or a dict from ``ModelImage.window`` (reuse).
    """
    if window is None or (isinstance(window, str) and window.strip().lower() == "auto"):
        if vol.default_window is not None:
            return dict(vol.default_window)
        if _looks_like_ct(vol):
            why = "modality CT" if vol.modality else "CT-like values"
            return _window_dict(WINDOW_PRESETS["soft_tissue"], "soft_tissue", auto=why)
        return _percentile_window(vol, auto="not CT")
    if isinstance(window, Window):
        return _window_dict(window)
    if isinstance(window, dict):  # e.g. the main image's ModelImage.window, reused for a region
        low, high = float(window["low"]), float(window["high"])
        if not high > low:
            raise ImageError(f"Window range must have high > low (got {low:g}..{high:g}).")
        if window.get("mode") == "percentile":
            return {"mode": "percentile", "percentiles": list(window.get("percentiles", PERCENTILES)),
                    "low": low, "high": high}
        return _window_dict(Window((low + high) / 2, high - low), window.get("preset"))
    if isinstance(window, str):
        key = window.strip().lower().replace("-", "_").replace(" ", "_")
        if key in WINDOW_PRESETS:
            return _window_dict(WINDOW_PRESETS[key], key)
        if key == "percentile":
            return _percentile_window(vol)
        parts = window.replace("/", ",").split(",")
        if len(parts) == 2:
            try:
                return _window_dict(Window(float(parts[0]), float(parts[1])))
            except ValueError:
                pass
    raise ImageError(f"Unknown window {window!r}: use one of auto, percentile, {', '.join(WINDOW_PRESETS)}, "
                     "or 'center,width' such as '40,400'.")


def describe_window(w: dict) -> str:
    """Short human text for a window dict (captions, CLI)."""
    if w.get("mode") == "percentile":
        text = f"percentile {w['percentiles'][0]:g}-{w['percentiles'][1]:g}% [{w['low']:.4g}, {w['high']:.4g}]"
    else:
        text = f"{w.get('preset') or 'window'} C{w['center']:g}/W{w['width']:g}"
    return text + (" (auto)" if w.get("auto") else "")


# --------------------------------------------------------------------------- model input
def choose_depth(n_slices: int, depth=None) -> int:
    """D: multiple of 4 closest to the slice count (4..64, ties to the smaller, as RadFM)."""
    if depth is None:
        return min(range(4, MAX_DEPTH + 1, 4), key=lambda d: abs(d - n_slices))
    if isinstance(depth, bool) or not isinstance(depth, int) or depth % 4 or not 4 <= depth <= MAX_DEPTH:
        raise ImageError(f"depth must be a multiple of 4 from 4 to {MAX_DEPTH} (got {depth!r}).")
    return depth


_INTERPOLATION = {"nearest": "nearest", "linear": "trilinear", "trilinear": "trilinear"}


@dataclass
class ModelImage:
    """One model input and where it came from (everything but the tensor is JSON-able)."""

    tensor: torch.Tensor  # float32 [3, 512, 512, D] = channel, rows, cols, slices; values in [0, 1]
    source: str
    window: dict
    original_shape: tuple  # display [slices, rows, cols] before resampling
    spacing_mm: tuple
    resample: dict
    notes: list = field(default_factory=list)
    crop_box: tuple | None = None

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "window": dict(self.window),
            "original_shape": [int(v) for v in self.original_shape],
            "spacing_mm": [round(float(v), 4) for v in self.spacing_mm],
            "resample": dict(self.resample),
            "tensor_shape": list(self.tensor.shape),
            "notes": list(self.notes),
            "crop_box": None if self.crop_box is None else [list(self.crop_box[0]), list(self.crop_box[1])],
        }

    def describe(self) -> str:
        shape = "x".join(str(v) for v in self.original_shape)
        return (f"{self.source}: {shape} voxels, {describe_window(self.window)}, "
                f"{self.resample['interpolation']} -> {list(self.tensor.shape)}")


def preprocess(vol: Volume, window=None, *, interpolation="nearest", depth=None) -> ModelImage:
    """Window to [0, 1], resize to 512 x 512 x D, repeat to 3 channels."""
    win = resolve_window(vol, window)
    d = choose_depth(vol.shape[0], depth)
    mode = _INTERPOLATION.get(str(interpolation).lower())
    if mode is None:
        raise ImageError(f"Unknown interpolation {interpolation!r}: use 'nearest' or 'linear'.")
    x = torch.from_numpy(vol.voxels)
    x = ((x - win["low"]) / (win["high"] - win["low"])).clamp_(0.0, 1.0)
    x = x.permute(1, 2, 0)[None, None]  # [1, 1, rows, cols, slices]
    size = (MODEL_SIZE, MODEL_SIZE, d)
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    x = torch.nn.functional.interpolate(x, size=size, mode=mode, **kwargs)[0]
    # The 3 channels share memory (an expanded view): call .contiguous() before editing in place.
    tensor = x.expand(3, -1, -1, -1)
    return ModelImage(tensor, vol.source, win, vol.shape, vol.spacing_mm,
                      {"size": list(size), "interpolation": "nearest" if mode == "nearest" else "linear"},
                      list(vol.notes), vol.crop_box)
