"""Display orientation: the original voxel grid, how it maps to display order, and :class:`Volume`.

``Volume.voxels`` is an array ``[slices, rows, cols]`` (integer scans keep their own dtype,
so an int16 CT stays int16: no float copy of the whole volume; others are float32) holding
axial slices the way a radiologist reads them:

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
"""

from __future__ import annotations

import itertools
import math
import mmap
from dataclasses import dataclass, field

import numpy as np

from ..errors import ImageError
from .windows import resolve_window

MAX_SLICES = 2048
MAX_INPLANE = 4096
MAX_VOXELS = 2_000_000_000
OBLIQUE_NOTE_DEG = 1.0

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse

# LPS unit vector followed by increasing (slice, row, col) index, per viewing plane.
_PLANES = {
    "axial": ((0, 0, -1), (0, 1, 0), (1, 0, 0)),  # S->I, A->P, R->L
    "coronal": ((0, 1, 0), (0, 0, -1), (1, 0, 0)),  # A->P, S->I, R->L
    "sagittal": ((1, 0, 0), (0, 0, -1), (0, 1, 0)),  # R->L, S->I, A->P
}
_PLANE_OF_NORMAL = {0: "sagittal", 1: "coronal", 2: "axial"}  # LPS axis closest to the normal

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


def affine_from_itk(size, spacing, origin, direction) -> np.ndarray:
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


def check_size(shape, source):
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


@dataclass
class Volume:
    """A scan in display orientation (see this module's docstring) with its geometry."""

    voxels: np.ndarray
    spacing_mm: tuple
    display_to_ras: np.ndarray
    source: str
    modality: str | None = None
    is_2d: bool = False
    notes: list = field(default_factory=list)
    # False where the source gives no size in mm (PNG/JPEG, a DICOM without PixelSpacing, an
    # array without geometry): 1 mm a voxel then stands in, and sizes are told in voxels.
    size_known: bool = True
    crop_box: tuple | None = None  # ((s, r, c) min incl., (s, r, c) max excl.) in the full display grid
    default_window: dict | None = None  # crops inherit the parent's automatic window
    grid: Grid | None = field(default=None, repr=False)
    # What made the voxels (see ``fingerprint``), taken once when the volume is built: model
    # images are known by it, so a follow-up never hashes pixels again. Voxels are not edited after.
    fingerprint: str | None = None
    dicom: object = None  # the DICOM instances it was read from (``dicom_source.DicomSource``), if any

    @property
    def shape(self) -> tuple:
        return tuple(self.voxels.shape)

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """4x4 of the ORIGINAL grid (the one masks and IJK boxes refer to)."""
        return LPS_TO_RAS @ self.grid.ijk_to_lps

    def edge_letters(self) -> tuple:
        """Patient directions at the left, right, top and bottom of a slice as shown: ("R", "L", "A", "P") axial."""
        def letter(v):
            axis = int(np.argmax(np.abs(v)))
            return "RAS"[axis] if v[axis] > 0 else "LPI"[axis]

        rows, cols = self.display_to_ras[:3, 1], self.display_to_ras[:3, 2]
        return letter(-cols), letter(cols), letter(-rows), letter(rows)

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
            size_known=self.size_known,
            crop_box=(tuple(int(v) for v in base + lo), tuple(int(v) for v in base + hi)),
            default_window=resolve_window(self, None),
            grid=self.grid,
            fingerprint=None if self.fingerprint is None else f"{self.fingerprint}[{lo.tolist()}:{hi.tolist()}]",
            dicom=self.dicom,
        )


def _mapped_read_only(array: np.ndarray) -> bool:
    """Whether ``array`` is a view of a file mapped read-only (``np.load(path, mmap_mode="r")``):
    nothing in this process can change its voxels, so a volume may keep it instead of a copy."""
    base = array
    while isinstance(base, np.ndarray):
        if base.flags.writeable:
            return False
        base = base.base
    return isinstance(base, mmap.mmap)


def fingerprint(array_kji: np.ndarray, ijk_to_lps: np.ndarray) -> str:
    """A fast hash (xxh3, ~10 GB/s) of the source voxels in their own compact dtype plus geometry."""
    import xxhash  # on first use: Slicer's process imports this module before its packages are installed

    digest = xxhash.xxh3_128(np.ascontiguousarray(array_kji).data)
    digest.update(f"{array_kji.dtype.str}{array_kji.shape}".encode())
    digest.update(np.ascontiguousarray(ijk_to_lps, dtype=np.float64).data)
    return digest.hexdigest()


def build_volume(array_kji, ijk_to_lps, source, modality=None, notes=(), size_known=True) -> Volume:
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
    check_size(grid.display_shape, source)
    if a.dtype.kind == "f" and a.dtype.itemsize > 4:  # voxels are kept in single precision
        largest = float(np.max(np.abs(a), where=np.isfinite(a), initial=0.0))
        if largest > float(np.finfo(np.float32).max):
            raise ImageError(f"{source} has values up to {largest:.3g}, beyond single precision (3.4e+38) where "
                             "scans are read: its rescale (DICOM RescaleSlope/Intercept, NIfTI scl_slope) is "
                             "likely wrong; fix the header or export the scan again.")
    if a.dtype.kind in "iu" and _mapped_read_only(a):
        vox = grid.reorient(a)  # the viewer's hand-over, mapped from its file: read in place, no second copy
    else:
        vox = np.array(grid.reorient(a), dtype=a.dtype if a.dtype.kind in "iu" else np.float32)  # a copy
    notes = list(notes)
    finite = np.isfinite(vox) if a.dtype.kind == "f" else None  # integer voxels are finite: no full-size mask
    if finite is not None and not finite.all():
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
    return Volume(vox, spacing, d2r, str(source), modality, vox.shape[0] == 1, notes, size_known, grid=grid,
                  fingerprint=fingerprint(a, m))


