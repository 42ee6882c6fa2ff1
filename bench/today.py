"""The image path as it was before images were known by their fingerprint, replicated for
same-run comparisons only (the library has no switch back to it):

* every question re-reads the scan and preprocesses it again (no ``ImageCache``);
* ``preprocess`` windows the whole volume into a float32 copy, then interpolates it;
* the engine copies every image tensor's float pixels (3 channels) to hash them (blake2b)
  and checks them all for NaN before looking in its cache.

``today_path()`` switches it on in this process for a block (the in-process benchmarks);
``bench/today_site/sitecustomize.py`` switches it on for a whole worker process.
"""

import contextlib
import hashlib

import numpy as np
import torch

from RadFMSlicer import ask
from RadFMSlicer.engine import RadFMEngine
from RadFMSlicer.image_cache import ImageCache
from RadFMSlicer.imaging import MODEL_SIZE, ModelImage, choose_depth, resolve_window


def preprocess(vol, window=None, *, interpolation="nearest", depth=None, device=None) -> ModelImage:
    """Window all voxels, then interpolate (as before; ``device`` was not known then)."""
    win = resolve_window(vol, window)
    d = choose_depth(vol.shape[0], depth)
    mode = "nearest" if interpolation == "nearest" else "trilinear"
    x = torch.from_numpy(np.array(vol.voxels))  # the volume's own copy of the scan, as every volume had then
    x = ((x - win["low"]) / (win["high"] - win["low"])).clamp_(0.0, 1.0)
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    x = torch.nn.functional.interpolate(x.permute(1, 2, 0)[None, None], size=(MODEL_SIZE, MODEL_SIZE, d),
                                        mode=mode, **kwargs)[0]
    return ModelImage(x[0].permute(2, 0, 1), vol.source, win, vol.shape, vol.spacing_mm,
                      {"size": [MODEL_SIZE, MODEL_SIZE, d], "interpolation": interpolation}, list(vol.notes),
                      vol.crop_box)


def encode_images(self, images) -> torch.Tensor:
    """Every image checked and hashed by its float pixels, then looked up (as before)."""
    tokens = []
    for image in images:
        tensor = getattr(image, "tensor", image)
        self.check_image(tensor)
        array = np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())
        digest = hashlib.blake2b(array.data, digest_size=16)
        digest.update(str(tuple(array.shape)).encode())
        cached = self.cache.get(digest.hexdigest())
        if cached is None:
            with torch.inference_mode():
                cached = self.model.encode_images(tensor.unsqueeze(0).to(self.device, self.dtype))[0].to(self.dtype)
            self.cache.put(digest.hexdigest(), cached)
        tokens.append(cached)
    return torch.cat(tokens)


def _no_cache() -> ImageCache:
    return ImageCache(0, 0)


def _patches() -> list:
    from RadFMSlicer.worker import server

    return [(ask, "preprocess", preprocess), (RadFMEngine, "encode_images", encode_images),
            (server, "ImageCache", _no_cache)]


def install() -> list:
    """Switch this process to today's path; returns what ``restore`` needs."""
    saved = []
    for owner, name, replacement in _patches():
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)
    return saved


def restore(saved: list) -> None:
    for owner, name, original in saved:
        setattr(owner, name, original)


@contextlib.contextmanager
def today_path(enabled: bool = True):
    saved = install() if enabled else []
    try:
        yield
    finally:
        restore(saved)
