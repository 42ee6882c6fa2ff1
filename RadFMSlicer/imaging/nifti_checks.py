"""What a NIfTI header says that ITK (so SimpleITK and 3D Slicer) reads without a word.

ITK takes 1 mm for a pixdim of 0, picks one of a qform and an sform that disagree, and
applies scl_slope whatever it is. The header is read here as written (nibabel, unchecked)
so that a voxel size that is none is refused and the rest becomes a note.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import SimpleITK as sitk

from ..errors import ImageError
from .geometry import LPS_TO_RAS, affine_from_itk


def nifti_header(path: str):
    """A NIfTI header as written: nibabel unchecked, as it would mend a pixdim of 0 into 1."""
    import nibabel  # on first use: only NIfTI files need it

    with nibabel.openers.ImageOpener(path) as f:
        raw = f.read(540)
    kind = nibabel.Nifti2Header if struct.unpack("<i", raw[:4])[0] in (540, 0x1C020000) else nibabel.Nifti1Header
    return kind(raw[:kind.sizeof_hdr], check=False)


def nifti_rescale(header) -> "str | None":
    """E.g. "scl_slope 1e+30 and scl_inter 0", or None where the reader keeps the values (slope 0 or 1, no inter)."""
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if slope in (0.0, 1.0) or not math.isfinite(slope):
        return None if inter == 0.0 or not math.isfinite(inter) or slope == 0.0 else f"scl_inter {inter:g}"
    return f"scl_slope {slope:g} and scl_inter {inter if math.isfinite(inter) else 0:g}"


def nifti_geometry_notes(path: str, header, image: sitk.Image) -> list:
    """A NIfTI's voxel size must be one; its two orientations (qform, sform) are compared.

    ITK (so SimpleITK and 3D Slicer) silently takes 1 mm for a pixdim of 0 and picks one of a
    qform and sform that disagree; which one it picked is read off the image it made.
    """
    n = min(max(int(header["dim"][0]), 1), 3)
    zooms = [float(v) for v in header["pixdim"][1:1 + n]]
    if not all(math.isfinite(v) and v != 0 for v in zooms):  # ITK reads a negative size as positive
        raise ImageError(f"{path}: its header gives no voxel size (pixdim {' x '.join(f'{v:g}' for v in zooms)}): "
                         "no size in mm can be given; set it (nibabel: img.header.set_zooms) or export the scan "
                         "again.")
    (qform, qcode), (sform, scode) = header.get_qform(coded=True), header.get_sform(coded=True)
    if not (qcode and scode):
        return []
    shape = [int(v) for v in header["dim"][1:4]]
    corners = np.array([[i, j, k, 1.0] for i in (0, max(shape[0] - 1, 0)) for j in (0, max(shape[1] - 1, 0))
                        for k in (0, max(shape[2] - 1, 0))]).T
    apart_mm = float(np.max(np.linalg.norm((qform @ corners - sform @ corners)[:3], axis=0)))
    rotations = [np.linalg.svd(m[:3, :3]) for m in (qform, sform)]  # nearest rotations: sizes left out
    rq, rs = (u @ vt for u, _, vt in rotations)
    apart_deg = math.degrees(math.acos(float(np.clip((np.trace(rq.T @ rs) - 1) / 2, -1.0, 1.0))))
    if apart_mm < 0.01 and apart_deg < 0.01:
        return []
    used = LPS_TO_RAS @ affine_from_itk(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    by_use = sorted((("qform", qform), ("sform", sform)),
                    key=lambda named: np.abs((named[1] @ corners - used @ corners)[:3]).max())
    return [f"the NIfTI qform and sform disagree (by up to {apart_mm:.3g} mm at the volume's corners, "
            f"{apart_deg:.3g} deg apart): the {by_use[0][0]} is used (as ITK and 3D Slicer read the file), the "
            f"{by_use[1][0]} ignored"]
