"""Marked regions (segment masks, ROI boxes) -> a close-up image plus facts for the prompt.

RadFM was not trained on region prompts, so a region is given as a second, cropped image
(the region's bounding box plus a margin, windowed like the parent) and described in one
sentence: size, mask volume and side.

Coordinates: masks and IJK boxes refer to the volume's ORIGINAL grid, numpy ``[k, j, i]``
(what Slicer's ``arrayFromSegmentBinaryLabelmap`` returns); ``crop_box`` and ``extent_mm``
are in display order (slice, row, col) -- see :mod:`RadFMSlicer.imaging`.

Side: the region centre's RAS x (+x = patient right) is compared with the volume's
mid-sagittal plane (the middle of its right-left field of view); within
``MIDLINE_MM`` it is "midline". A scan under 50 mm wide right-left (a sagittal slice or
slab) has no usable middle, so x = 0 (scanner isocentre) is used instead; a picture with no
size in mm (PNG/JPEG) always uses its middle, and its sizes are told in pixels.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import numpy as np

from .errors import ImageError
from .imaging import Volume

if TYPE_CHECKING:
    import SimpleITK as sitk

MIDLINE_MM = 10.0
NARROW_FOV_MM = 50.0
_AXIS_LABELS = ("RL", "AP", "SI")  # RAS x, y, z


@dataclass
class Region:
    """A marked region: its close-up volume and the facts told to the model."""

    name: str
    # The crop (box + margin). preprocess(region.volume) uses the parent's automatic window;
    # pass window=main_image.window to reuse whatever window the main image was given.
    volume: Volume
    crop_box: tuple  # ((s, r, c) min incl., (s, r, c) max excl.) in the parent's display index
    extent_mm: tuple  # the region's own bounding box (no margin), display order
    volume_ml: float | None  # masks only
    center_ras: tuple
    side: str  # "right", "left" or "midline"
    axis_labels: tuple = ("SI", "AP", "RL")  # anatomical axis of each display axis
    notes: list = field(default_factory=list)

    @property
    def extent_by_axis(self) -> dict:
        return dict(zip(self.axis_labels, self.extent_mm))

    @property
    def crop_extent_by_axis(self) -> dict:
        """What the close-up image really shows (region plus margin, clipped to the scan), in mm per axis."""
        (lo, hi), spacing = self.crop_box, self.volume.spacing_mm
        return dict(zip(self.axis_labels, ((b - a) * d for a, b, d in zip(lo, hi, spacing))))

    @property
    def is_whole_scan(self) -> bool:
        """Whether the crop is the whole scan (a box over the whole slice): then it is no close-up."""
        lo, hi = self.crop_box
        return tuple(lo) == (0, 0, 0) and tuple(hi) == tuple(self.volume.grid.display_shape)

    def _size(self, by_axis: dict, whole: bool = False) -> str:
        """E.g. "13 x 20 x 5 mm", or "20 x 30 x 1 pixels" where the scan gives no size in mm; RL x AP x SI."""
        if self.volume.size_known:
            return f"{_in_order(by_axis, whole)} mm"
        voxel = dict(zip(self.axis_labels, self.volume.spacing_mm))  # the 1 mm standing in for a voxel
        return f"{_in_order({k: v / voxel[k] for k, v in by_axis.items()}, True)} pixels"

    def facts(self, ordinal: str = "second") -> str:
        """The prompt's sentence: what the image shows, the region's size, volume and side."""
        parts = [f"about {self._size(self.extent_by_axis, whole=True)} (RL x AP x SI)"]
        if self.volume_ml is not None and self.volume.size_known:
            parts.append(f"volume {_ml(self.volume_ml)} mL")
        where = "near the midline of the scan" if self.side == "midline" else f"in the {self.side} side of the scan"
        if self.is_whole_scan:
            return (f'The {ordinal} image is the whole scan again, not a close-up: the marked region "{self.name}" '
                    f"is {', '.join(parts)}, {where}.")
        return (f'The {ordinal} image is a close-up of the marked region "{self.name}": '
                f"{', '.join(parts)}, {where}; the image shows {self._size(self.crop_extent_by_axis, whole=True)} "
                "of the scan around it.")

    def describe(self) -> str:
        """The region in one line of text for its image's notes: name, size, centre, side and crop."""
        (s0, r0, c0), (s1, r1, c1) = self.crop_box
        parts = [f'"{self.name}"', f"{self._size(self.extent_by_axis)} (RL x AP x SI)"]
        if self.volume_ml is not None and self.volume.size_known:
            parts.append(f"{_ml(self.volume_ml)} mL")
        crop = f"slices {s0}-{s1 - 1}, rows {r0}-{r1 - 1}, columns {c0}-{c1 - 1} of the scan as shown"
        shown = (f"the whole scan, not a close-up ({crop})" if self.is_whole_scan
                 else f"close-up of {crop} ({self._size(self.crop_extent_by_axis)})")
        parts += ["centre RAS ({:.1f}, {:.1f}, {:.1f}) mm".format(*self.center_ras), f"side: {self.side}", shown]
        return ", ".join(parts)


def _in_order(by_axis: dict, whole: bool = False) -> str:
    """E.g. "13.2 x 19.8 x 5" in RL x AP x SI order; ``whole``: rounded half up to whole numbers (12.5 -> 13)."""
    return " x ".join(str(math.floor(by_axis[k] + 0.5)) if whole else f"{by_axis[k]:.3g}" for k in _AXIS_LABELS)


def _ml(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2g}"


def _axis_labels(vol: Volume) -> tuple:
    return tuple(_AXIS_LABELS[int(np.argmax(np.abs(vol.display_to_ras[:3, d])))] for d in range(3))


def _to_ras(vol: Volume, index) -> np.ndarray:
    return (vol.display_to_ras @ np.append(np.asarray(index, dtype=float), 1.0))[:3]


def _side(vol: Volume, x: float) -> str:
    corners = [_to_ras(vol, c) for c in itertools.product(*[(-0.5, n - 0.5) for n in vol.shape])]
    xs = [c[0] for c in corners]
    wide = max(xs) - min(xs) >= NARROW_FOV_MM or not vol.size_known  # a picture: its middle, whatever its size
    mid = (max(xs) + min(xs)) / 2 if wide else 0.0
    dx = x - mid
    return "midline" if abs(dx) <= MIDLINE_MM else "right" if dx > 0 else "left"


def _make_region(vol, lo, hi, center, name, margin_mm, volume_ml, notes) -> Region:
    """Shared tail: region box ``[lo, hi]`` (inclusive display index) -> crop + facts."""
    if not (isinstance(margin_mm, (int, float)) and math.isfinite(margin_mm) and margin_mm >= 0):
        raise ImageError(f"Region margin must be a number of mm >= 0 (got {margin_mm!r}).")
    spacing = np.asarray(vol.spacing_mm)
    lo, hi = np.asarray(lo, dtype=int), np.asarray(hi, dtype=int)
    pad = np.ceil(margin_mm / spacing).astype(int)
    box_lo = np.maximum(lo - pad, 0)
    box_hi = np.minimum(hi + 1 + pad, vol.shape)
    crop = vol.crop(box_lo, box_hi, f"region {name}")
    crop.notes.extend(notes)
    center_ras = _to_ras(vol, center)
    return Region(name=name, volume=crop, crop_box=crop.crop_box,
                  extent_mm=tuple(float(v) for v in (hi - lo + 1) * spacing), volume_ml=volume_ml,
                  center_ras=tuple(float(v) for v in center_ras), side=_side(vol, center_ras[0]),
                  axis_labels=_axis_labels(vol), notes=list(notes))


def region_from_mask(vol: Volume, mask_kji, label=None, margin_mm=10.0, name="region") -> Region:
    """Region from a label/binary mask on the volume's original ``[k, j, i]`` grid, or a label map file.

    ``label=None`` takes every nonzero voxel; the centre is the mask's centroid. A file is read
    by :func:`load_mask` (a label map on another grid is resampled onto the volume's, and noted).
    """
    notes = []
    if isinstance(mask_kji, (str, os.PathLike)):
        mask_kji = load_mask(mask_kji, vol, notes)
    mask = vol.to_display(mask_kji)
    sel = mask != 0 if label is None else mask == label
    count = int(sel.sum())
    if count == 0:
        if label is None:
            raise ImageError(f"The mask for region '{name}' is empty: paint at least one voxel.")
        present = np.unique(mask[mask != 0])
        shown = ", ".join(f"{v:g}" for v in present[:20]) or "none"
        raise ImageError(f"Label {label} is not in the mask for region '{name}' (labels present: {shown}).")
    idx = np.nonzero(sel)
    lo = [int(i.min()) for i in idx]
    hi = [int(i.max()) for i in idx]
    center = [float(i.mean()) for i in idx]
    ml = count * float(np.prod(vol.spacing_mm)) / 1000.0
    return _make_region(vol, lo, hi, center, name, margin_mm, ml, notes)


def check_corner(values, what, name):
    """One box corner as 3 finite numbers (also checked by front ends before the model loads)."""
    try:
        v = np.asarray(values, dtype=float).reshape(3)
    except (TypeError, ValueError):
        raise ImageError(f"Region '{name}': {what} must be 3 numbers (got {values!r}).") from None
    if not np.isfinite(v).all():
        raise ImageError(f"Region '{name}': {what} must be finite (got {values!r}).")
    return v


def region_from_box(vol: Volume, ras_min=None, ras_max=None, *, ijk_min=None, ijk_max=None,
                    margin_mm=10.0, name="region") -> Region:
    """Region from a box: corners in RAS mm, or inclusive voxel indices (i, j, k) of the original grid.

    Every voxel the box touches is in the region; a box partly outside is clipped (noted).
    """
    if (ras_min is None) == (ijk_min is None) or (ras_min is None) != (ras_max is None) \
            or (ijk_min is None) != (ijk_max is None):
        raise ImageError(f"Region '{name}': give either ras_min and ras_max, or ijk_min and ijk_max.")
    if ras_min is not None:
        a, b = check_corner(ras_min, "ras_min", name), check_corner(ras_max, "ras_max", name)
        corners_ras = [np.array(c) for c in itertools.product(*zip(a, b))]
        what = "RAS"
    else:
        a, b = check_corner(ijk_min, "ijk_min", name), check_corner(ijk_max, "ijk_max", name)
        to_ras = vol.ijk_to_ras
        corners_ras = [(to_ras @ np.append(c, 1.0))[:3] for c in itertools.product(*zip(a, b))]
        what = "IJK"
    what += " {}..{}".format(*("[" + ", ".join(f"{v:g}" for v in corner) + "]"
                               for corner in (np.minimum(a, b), np.maximum(a, b))))
    inv = np.linalg.inv(vol.display_to_ras)
    with np.errstate(over="ignore", invalid="ignore"):  # corners near the float limit: refused below
        idx = np.array([(inv @ np.append(c, 1.0))[:3] for c in corners_ras])
    if not np.isfinite(idx).all():
        raise ImageError(f"Box for region '{name}' ({what}) is too far out to place on the volume {vol.source}: "
                         "give corners near the scan (a box partly outside it is clipped).")
    idx = np.clip(idx, -1.0, vol.shape)  # a corner beyond the volume is clipped below anyway: cast only what fits
    eps = 1e-6  # voxel n spans [n - 0.5, n + 0.5]: take every voxel the box overlaps
    lo = np.floor(idx.min(axis=0) + 0.5 + eps).astype(int)
    hi = np.ceil(idx.max(axis=0) - 0.5 - eps).astype(int)
    hi = np.maximum(hi, lo)  # a box thinner than a voxel still holds the voxel it lies in
    shape = np.asarray(vol.shape)
    c_lo, c_hi = np.maximum(lo, 0), np.minimum(hi, shape - 1)
    if (c_lo > c_hi).any():
        raise ImageError(f"Box for region '{name}' ({what}) lies entirely outside the volume {vol.source}.")
    notes = []
    if (c_lo != lo).any() or (c_hi != hi).any():
        notes.append(f"box {what} clipped to the volume")
    return _make_region(vol, c_lo, c_hi, (c_lo + c_hi) / 2.0, name, margin_mm, None, notes)


def load_mask(path, vol: Volume, notes: list | None = None) -> np.ndarray:
    """Read a label map and return it on the volume's ORIGINAL ``[k, j, i]`` grid.

    Same size and geometry: used as is. Otherwise resampled (nearest neighbour) onto the
    volume's grid by physical position, so a label map saved on another grid of the same
    patient still fits; ``notes`` then gets a line naming both grids.
    """
    import SimpleITK as sitk  # imported to read a label map, not to check a box's numbers

    from .imaging import read_info, read_pixels

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageError(f"Label map not found: {path}")
    image, _ = read_pixels(read_info(path), path)  # unreadable or truncated -> ImageError
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() not in (2, 3):
        raise ImageError(f"Label map {path} must be a single-component 2D/3D image.")
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    grid = vol.grid
    ref = sitk.Image(*grid.shape[::-1], image.GetPixelID())
    m = grid.ijk_to_lps
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    ref.SetSpacing(spacing.tolist())
    ref.SetOrigin(m[:3, 3].tolist())
    ref.SetDirection((m[:3, :3] / spacing).ravel().tolist())
    same = (image.GetSize() == ref.GetSize()
            and np.allclose(image.GetSpacing(), ref.GetSpacing(), rtol=1e-4, atol=1e-4)
            and np.allclose(image.GetOrigin(), ref.GetOrigin(), atol=1e-3)
            and np.allclose(image.GetDirection(), ref.GetDirection(), atol=1e-4))
    source = sitk.GetArrayFromImage(image)
    if same:
        return source
    out = sitk.GetArrayFromImage(sitk.Resample(image, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    if source.any() and not out.any():
        raise ImageError(f"Label map {path} does not overlap the volume {vol.source}: is it from the same scan?")
    if notes is not None:
        notes.append(f"label map {os.path.basename(path)} is on another grid ({_grid_text(image)}) than the scan "
                     f"({_grid_text(ref)}): resampled onto the scan's grid by position (nearest neighbour)")
    return out


def _grid_text(image: sitk.Image) -> str:
    """E.g. "16x32x8 voxels of 1x1x2.5 mm", in the file's own (i, j, k) order."""
    size, spacing = ("x".join(f"{v:.4g}" for v in values) for values in (image.GetSize(), image.GetSpacing()))
    return f"{size} voxels of {spacing} mm"
