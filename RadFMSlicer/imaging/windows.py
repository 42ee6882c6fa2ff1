"""Display windows: presets, automatic choice (CT soft tissue, else percentiles), text spellings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ImageError

if TYPE_CHECKING:
    from .geometry import Volume

PERCENTILES = (0.5, 99.5)
_WINDOW_EXAMPLE = 'give "centre,width" such as "40,400" (soft tissue)'


@dataclass(frozen=True)
class Window:
    """Display window in the scan's units (HU for CT)."""

    center: float
    width: float

    def __post_init__(self):
        got = f"got centre {self.center:g}, width {self.width:g}"
        if not math.isfinite(self.center):
            raise ImageError(f"Window centre must be a finite number ({got}); {_WINDOW_EXAMPLE}.")
        if not (math.isfinite(self.width) and self.width > 0):
            raise ImageError(f"Window width must be a number > 0 ({got}); {_WINDOW_EXAMPLE}.")
        with np.errstate(over="ignore", invalid="ignore"):  # scans are windowed in float32: these must exist there
            low, high = np.float32(self.low), np.float32(self.high)
            width = high - low
        if not (np.isfinite(low) and np.isfinite(high) and np.isfinite(width) and width > 0):
            raise ImageError(f"Window {self.center:g},{self.width:g} cannot be applied: scans are windowed in single "
                             f"precision, where its low, high and width come out as {low:g}, {high:g}, {width:g}; "
                             f"each must be finite (under 3.4e38) and the width above 0; {_WINDOW_EXAMPLE}.")

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


def parse_window(window=None) -> "dict | str | None":
    """Check a window spelling without a volume: None (automatic), "percentile" or a window dict.

    Accepted: None/"auto" (CT -> soft tissue, else percentile), a :class:`Window`, a preset
    name, "percentile", "center,width" text, or a dict from ``ModelImage.window`` (reuse).
    Front ends call it before the model loads, so a bad spelling costs no wait.
    """
    if window is None or (isinstance(window, str) and window.strip().lower() == "auto"):
        return None
    if isinstance(window, Window):
        return _window_dict(window)
    if isinstance(window, dict):  # e.g. the main image's ModelImage.window, reused for a region
        try:
            low, high = float(window["low"]), float(window["high"])
        except (KeyError, TypeError, ValueError):
            raise ImageError(f"A window object needs numbers 'low' and 'high' (got {window!r:.80}).") from None
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
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
            return key
        parts = window.replace("/", ",").split(",")
        if len(parts) == 2:
            try:
                return _window_dict(Window(float(parts[0]), float(parts[1])))
            except ValueError:
                pass
    raise ImageError(f"Unknown window {window!r}: use one of auto, percentile, {', '.join(WINDOW_PRESETS)}, "
                     "or 'centre,width' such as '40,400'.")


def resolve_window(vol: Volume, window=None) -> dict:
    """Turn any accepted window spelling (see :func:`parse_window`) into a dict with absolute low/high."""
    spec = parse_window(window)
    if spec is None:
        if vol.default_window is not None:
            return dict(vol.default_window)
        if _looks_like_ct(vol):
            why = "modality CT" if vol.modality else "CT-like values"
            return _window_dict(WINDOW_PRESETS["soft_tissue"], "soft_tissue", auto=why)
        return _percentile_window(vol, auto="not CT")
    if spec == "percentile":
        return _percentile_window(vol)
    return spec


def describe_window(w: dict) -> str:
    """Short human text for a window dict (captions, CLI)."""
    if w.get("mode") == "percentile":
        text = f"percentile {w['percentiles'][0]:g}-{w['percentiles'][1]:g}% [{w['low']:.4g}, {w['high']:.4g}]"
    else:
        text = f"{w.get('preset') or 'window'} C{w['center']:g}/W{w['width']:g}"
    return text + (" (auto)" if w.get("auto") else "")
