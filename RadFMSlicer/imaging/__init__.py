"""Scan on disk or array in memory -> the exact tensor RadFM sees.

The steps, one module each, in the order data flows:

* :mod:`.io` -- arrays (Slicer's ``arrayFromVolume``) and files (NIfTI, NRRD, MHA, DICOM,
  PNG/JPEG, RadFM's ``.npy``) are checked and read into a :class:`Volume`; :mod:`.dicom_checks` and
  :mod:`.nifti_checks` hold what those headers must say first (a DICOM file's pixels
  fitting its header, one series one patient, a NIfTI voxel size ...);
* :mod:`.geometry` -- every volume is brought to one display orientation (axial, anterior
  up, patient right on the left, superior slice first) with its exact geometry kept;
* :mod:`.windows` -- the display window (preset, automatic, or given) maps values to [0, 1];
* :mod:`.model_input` -- ``preprocess`` resizes to the ``[3, 512, 512, D]`` RadFM input.
"""

import importlib

from .geometry import LPS_TO_RAS, MAX_INPLANE, MAX_SLICES, MAX_VOXELS, Grid, Volume
from .windows import PERCENTILES, WINDOW_PRESETS, Window, describe_window, parse_window, resolve_window

# io needs SimpleITK (and model_input torch, off the CPU or for linear resizing): their names
# (the rest of __all__) load on first use, so Slicer's process (the panel and the session only
# describe windows) runs without them. model_input is looked in first: checking a request's
# flags (it imports preprocess) needs no SimpleITK.
_LAZY_MODULES = ("model_input", "io")


def __getattr__(name):
    if name in __all__:
        for module in _LAZY_MODULES:
            module = importlib.import_module(f".{module}", __name__)
            if hasattr(module, name):
                return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LPS_TO_RAS", "MAX_DEPTH", "MAX_INPLANE", "MAX_SLICES", "MAX_VOXELS", "MODEL_SIZE", "PERCENTILES",
    "SUPPORTED", "WINDOW_PRESETS", "Grid", "ModelImage", "Volume", "Window", "choose_depth",
    "describe_window", "load_volume", "parse_window", "preprocess", "read_info", "read_pixels", "resolve_window",
    "volume_from_array",
]
