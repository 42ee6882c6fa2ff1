"""The exact tensor RadFM sees: :class:`Volume` -> windowed, resized ``[3, 512, 512, D]``.

``preprocess`` windows to [0, 1], then resizes ``[rows, cols, slices]`` to 512 x 512 x D
with ``torch.nn.functional.interpolate`` (nearest by default, as RadFM training did),
D being the multiple of 4 closest to the slice count (4..64, ties to the smaller, like
RadFM's ``stack_images``), and repeats gray to 3 channels: ``[3, 512, 512, D]`` =
channel, rows (H), cols (W), slices (D), the per-image layout of RadFM's ``vision_x``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ImageError
from .geometry import Volume
from .windows import describe_window, resolve_window

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
