"""Where the model looked: the perceiver resampler's attention, on the scan's own voxels.

The resampler's 32 latents attend to the vision encoder's patches (16 x 16 x D/4 of them
for a 512 x 512 x D image) and become the 32 image tokens the LLM reads. Averaged over
heads, latents and layers, that attention says which parts of the volume fed those
tokens. It is RESAMPLER ATTENTION, NOT AN EXPLANATION: it does not say why the model
answered as it did, and every output built from it says so (:data:`LABEL`).

Normalisation: per layer the map sums to 1 over the patches (see
:class:`~RadFMSlicer.model.resampler.PerceiverResampler`); the layer mean therefore also
sums to 1. On the scan (:func:`scan_map`) it is divided by its maximum: 1 marks the
most-attended patch, 0 a patch the latents ignored.
"""

import io
from pathlib import Path

import numpy as np

from . import storage
from .errors import ImageError

LABEL = "resampler attention, not an explanation"


def patch_map(engine, image) -> np.ndarray:
    """The layer-averaged map ``[H/32, W/32, D/4]`` of a model image (sums to 1), from the engine's cache."""
    return engine.image_attention(image).mean(dim=0).numpy()


def scan_map(patch_grid: np.ndarray, volume) -> np.ndarray:
    """``patch_grid`` on ``volume``'s original ``[k, j, i]`` grid, scaled so its maximum is 1."""
    from .imaging.model_input import patch_map_to_scan

    voxels = patch_map_to_scan(patch_grid, volume)
    peak = float(voxels.max())
    return voxels / peak if peak > 0 else voxels


def write_scan_map(path: "str | Path", voxels_kji: np.ndarray, volume) -> Path:
    """Write the map with the scan's own geometry (origin, spacing, direction), so any viewer overlays it."""
    import SimpleITK as sitk

    path = Path(path)
    check_map_name(path)
    if path.name.endswith(".dcm"):  # a DICOM Parametric Map in the scan's study, for PACS viewers
        from . import dicom_report

        dicom_report.write(dicom_report.attention_map(voxels_kji, volume, LABEL), path)
        return path
    ijk_to_lps = volume.grid.ijk_to_lps
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.asarray(voxels_kji, np.float32))
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    image.SetDirection([float(v) for v in (ijk_to_lps[:3, :3] / spacing).ravel()])
    image.SetMetaData("ITK_FileNotes", LABEL)  # NIfTI 'descrip', NRRD/MHA notes: the label travels with the file
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def overlay(patch_grid: np.ndarray, image) -> np.ndarray:
    """The map on the model tensor's own grid ``[H, W, D]`` (max 1), for drawing over its thumbnails."""
    h, w, d = image.tensor.shape[1:]
    up = np.kron(patch_grid, np.ones((h // patch_grid.shape[0], w // patch_grid.shape[1], d // patch_grid.shape[2])))
    peak = float(up.max())
    return (up / peak if peak > 0 else up).astype(np.float32)


def check_map_name(path: "str | Path") -> None:
    """Refuse, before any work, a map name no viewer would read as a volume."""
    if not Path(path).name.endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".dcm")):
        raise ImageError(f"--attention {path}: name the map .nii.gz, .nii, .nrrd or .mha "
                         "(or .dcm: a DICOM Parametric Map, for a DICOM scan)")


def write_for_ask(engine, prepared, path: "str | Path") -> dict:
    """The current study's map written on its own grid, before the answer (so the answer reuses the
    encoding); returns what the turn's provenance records about it. The grid is the scan ``prepared``
    was made from (:attr:`~RadFMSlicer.ask.PreparedAsk.volumes`): it is not read again."""
    return _provenance(write_scan_map(path, _current_scan_map(engine, prepared), prepared.volumes[0]))


def write_npy_for_ask(engine, prepared, folder: "str | Path") -> dict:
    """The worker's form of :func:`write_for_ask`: the map as a float32 ``[k, j, i]`` ``.npy`` on the
    current study's grid in ``folder`` (the viewer already has the geometry; arrays never travel in JSON)."""
    import uuid

    path = Path(folder) / f"attention-{uuid.uuid4().hex[:12]}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    array = io.BytesIO()
    np.save(array, _current_scan_map(engine, prepared).astype(np.float32))
    storage.write_once(path, array.getvalue())  # whole or not at all: the viewer never reads a cut map
    return _provenance(path)


def _current_scan_map(engine, prepared) -> np.ndarray:
    """The map of the current study's model image on the scan it was made from (not read again)."""
    return scan_map(patch_map(engine, prepared.model_images[0]), prepared.volumes[0])


def _provenance(path: Path) -> dict:
    return {"file": str(path), "image": "the first (current study) image", "label": LABEL,
            "normalisation": "mean over resampler layers, heads and latents; on the scan divided by its maximum "
                             "(1 = the most-attended patch)"}
