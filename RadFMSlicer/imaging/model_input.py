"""The exact tensor RadFM sees: :class:`Volume` -> windowed, resized ``[3, 512, 512, D]``.

``preprocess`` windows to [0, 1], then resizes ``[rows, cols, slices]`` to 512 x 512 x D
as ``torch.nn.functional.interpolate`` does (nearest by default, as RadFM training did),
D being the multiple of 4 closest to the slice count (4..64, ties to the smaller, like
RadFM's ``stack_images``), and repeats gray to 3 channels: ``[3, 512, 512, D]`` =
channel, rows (H), cols (W), slices (D), the per-image layout of RadFM's ``vision_x``.

On the CPU with nearest neighbour (the default) the resize is a pick of whole rows, columns
and slices, done in numpy with the indices ``interpolate`` computes: a preview or a request
checked for a server never imports torch (seconds at start); the model gets the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ImageError
from .geometry import Volume
from .windows import describe_window, resolve_window

if TYPE_CHECKING:
    import torch

MODEL_SIZE = 512
MAX_DEPTH = 64


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
    """One model input and where it came from (everything but the pixels is JSON-able)."""

    # float32 [D, 512, 512] = slices, rows, cols; values in [0, 1]. A numpy array when made on the CPU
    # with nearest neighbour, else a torch tensor on the device it was made on.
    pixels: np.ndarray | torch.Tensor
    source: str
    window: dict
    original_shape: tuple  # display [slices, rows, cols] before resampling
    spacing_mm: tuple
    resample: dict
    notes: list = field(default_factory=list)
    crop_box: tuple | None = None
    # What made the tensor: the source's fingerprint plus the recipe (window, resampling).
    # The engine caches encodings under it; None (no fingerprint known) means hash the pixels.
    key: str | None = None

    @property
    def tensor(self) -> torch.Tensor:
        """float32 ``[3, 512, 512, D]`` = channel, rows, cols, slices: the model's input. A view of
        ``pixels`` whose 3 channels share memory: call ``.contiguous()`` before editing in place."""
        import torch

        return torch.as_tensor(self.pixels).permute(1, 2, 0).expand(3, -1, -1, -1)

    @property
    def shape(self) -> tuple:
        """The tensor's shape ``(3, 512, 512, D)``, known without torch."""
        depth, rows, cols = self.pixels.shape
        return 3, rows, cols, depth

    def slices(self) -> np.ndarray:
        """float32 ``[D, 512, 512]`` in memory (what a preview draws)."""
        if isinstance(self.pixels, np.ndarray):
            return self.pixels
        return self.pixels.detach().cpu().numpy()

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "window": dict(self.window),
            "original_shape": [int(v) for v in self.original_shape],
            "spacing_mm": [round(float(v), 4) for v in self.spacing_mm],
            "resample": dict(self.resample),
            "tensor_shape": list(self.shape),
            "notes": list(self.notes),
            "crop_box": None if self.crop_box is None else [list(self.crop_box[0]), list(self.crop_box[1])],
        }

    def describe(self) -> str:
        shape = "x".join(str(v) for v in self.original_shape)
        return (f"{self.source}: {shape} voxels, {describe_window(self.window)}, "
                f"{self.resample['interpolation']} -> {list(self.shape)}")


def preprocess(vol: Volume, window=None, *, interpolation="nearest", depth=None, device=None) -> ModelImage:
    """Window to [0, 1], resize to 512 x 512 x D, repeat to 3 channels (on ``device``, default CPU).

    Nearest neighbour picks its source slices first (the indices ``interpolate`` would use)
    and windows only those in float32: D slices, never a float copy of the whole volume; on
    the CPU one slice at a time, while it is in cache (a GPU gets the picked slices in the
    scan's own compact dtype). Linear windows one float32 copy of the volume in place, then
    interpolates it.
    """
    win = resolve_window(vol, window)
    d = choose_depth(vol.shape[0], depth)
    mode = _INTERPOLATION.get(str(interpolation).lower())
    if mode is None:
        raise ImageError(f"Unknown interpolation {interpolation!r}: use 'nearest' or 'linear'.")
    size = (d, MODEL_SIZE, MODEL_SIZE)  # [slices, rows, cols]
    on_cpu = device is None or str(device).split(":")[0] == "cpu"
    if mode == "nearest" and on_cpu:
        x = _window_slices(vol.voxels, nearest_indices(vol.shape[0], d), win)  # whole slices, as interpolate picks
        if x.shape[1:] != size[1:]:
            x = np.take(x, nearest_indices(x.shape[1], MODEL_SIZE), axis=1)  # rows, then columns: faster than
            x = np.take(x, nearest_indices(x.shape[2], MODEL_SIZE), axis=2)  # one 2-D fancy index or interpolate
    else:
        import torch

        if mode == "nearest":
            picked = vol.voxels[nearest_indices(vol.shape[0], d)]  # whole slices (np.take: 7x slower on a flipped view)
            x = _window_(_float_tensor(picked, device, copy=False), win)  # own buffer, in place
            if x.shape[1:] != size[1:]:
                x = torch.nn.functional.interpolate(x[None], size=size[1:], mode="nearest")[0]
        else:
            x = _window_(_float_tensor(vol.voxels, device, copy=True), win)
            x = torch.nn.functional.interpolate(x[None, None], size=size, mode=mode, align_corners=False)[0, 0]
    key = None if vol.fingerprint is None else f"{vol.fingerprint}|{mode} {list(size)}|{win['low']!r},{win['high']!r}"
    return ModelImage(x, vol.source, win, vol.shape, vol.spacing_mm,
                      {"size": [MODEL_SIZE, MODEL_SIZE, d], "interpolation": "nearest" if mode == "nearest" else "linear"},
                      list(vol.notes), vol.crop_box, key)


def patch_map_to_scan(patch_map, vol: Volume) -> np.ndarray:
    """A map on the model's patch grid back on the scan's own voxels: the inverse of ``preprocess``.

    ``patch_map``: ``[H/32, W/32, D/4]`` (rows, cols, slices of the model tensor, e.g. the
    resampler's attention). Returns float32 ``[k, j, i]`` on the ORIGINAL grid of ``vol``
    (undoing the resample, the crop of a region and the reorientation), each voxel holding
    the value of the patch its model position fell in; voxels outside a region's crop are 0.
    """
    patch_map = np.asarray(patch_map, dtype=np.float32)
    slices, rows, cols = vol.shape
    h, w, f = patch_map.shape
    patch = MODEL_SIZE // h, MODEL_SIZE // w, 4

    def patch_of(n_voxels: int, n_model: int, size: int) -> np.ndarray:  # display index -> patch index
        return (np.arange(n_voxels) * n_model // n_voxels) // size

    display = patch_map[np.ix_(patch_of(rows, h * patch[0], patch[0]), patch_of(cols, w * patch[1], patch[1]),
                               patch_of(slices, f * patch[2], patch[2]))].transpose(2, 0, 1)  # [slices, rows, cols]
    if vol.crop_box is not None:
        full = np.zeros(vol.grid.display_shape, np.float32)
        (s0, r0, c0), (s1, r1, c1) = vol.crop_box
        full[s0:s1, r0:r1, c0:c1] = display
        display = full
    grid = vol.grid
    display = np.flip(display, [d for d in range(3) if grid.flips[d]])
    return np.ascontiguousarray(np.transpose(display, np.argsort(grid.axes)))


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """The source index of each output position, exactly as ``interpolate(mode="nearest")`` picks it:
    ATen's ``nearest_idx``, ``min(floor(i * float32(n_in / n_out)), n_in - 1)`` in float32, with its
    two special cases (same size, twice the size)."""
    out = np.arange(n_out)
    if n_out == n_in:
        return out
    if n_out == 2 * n_in:
        return out >> 1
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(out.astype(np.float32) * scale).astype(np.int64), n_in - 1)


def _float_tensor(array: np.ndarray, device, copy: bool) -> torch.Tensor:
    """float32 on ``device``, moved there in the array's own (compact) dtype; a new buffer if ``copy``.

    A volume mapped from the viewer's hand-over is read-only and may be flipped (negative
    strides), which torch cannot wrap: it is copied in its compact dtype first."""
    import torch

    if not array.flags.writeable or min(array.strides) < 0:
        array, copy = np.array(array), False  # the copy is already a new buffer
    return torch.from_numpy(array).to(device).to(torch.float32, copy=copy)


def _window_slices(voxels: np.ndarray, picks: np.ndarray, win: dict) -> np.ndarray:
    """float32 ``[len(picks), rows, cols]``: each picked slice windowed as :func:`_window_` does
    (cast to float32, subtract low, divide by the width, clamp), one slice at a time, so each
    step reads memory that is still in cache: half the time of whole-array passes."""
    out = np.empty((len(picks), *voxels.shape[1:]), dtype=np.float32)
    low, width = np.float32(win["low"]), np.float32(win["high"] - win["low"])
    with np.errstate(over="ignore"):  # far outside a very narrow window a value overflows to +-inf: clipped to 0 or 1
        for k, source in enumerate(picks):
            slice_ = out[k]
            np.subtract(voxels[source], low, out=slice_, dtype=np.float32)
            np.divide(slice_, width, out=slice_)
            np.clip(slice_, 0.0, 1.0, out=slice_)
    return out


def _window_(x: torch.Tensor, win: dict) -> torch.Tensor:
    """Map ``[low, high]`` to [0, 1] in place (clamped outside)."""
    return x.sub_(win["low"]).div_(win["high"] - win["low"]).clamp_(0.0, 1.0)
