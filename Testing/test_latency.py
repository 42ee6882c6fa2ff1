"""What a radiologist feels between questions: a follow-up reads no pixels again.

An image is known by what made it (its source's fingerprint, taken once when the volume
is built, plus the recipe), so asking again about an encoded scan hashes, checks and
preprocesses nothing; anything that changes the pixels the model sees changes the key.
"""

import numpy as np
import pytest
import torch

from RadFMSlicer import engine as engine_module
from RadFMSlicer.generation import GenerationSettings
from RadFMSlicer.imaging import preprocess, volume_from_array

CT_GEOMETRY = np.diag([-0.7, -0.7, 2.5, 1.0])


def ct_array(slices=12, size=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, (slices, size, size)).astype(np.int16)


def ct_image(array=None, window="soft_tissue", geometry=CT_GEOMETRY, **kwargs):
    volume = volume_from_array(ct_array() if array is None else array, geometry, name="ct")
    return preprocess(volume, window, **kwargs)


@pytest.fixture
def counted(monkeypatch):
    """Counts of the calls that read every pixel of an image tensor."""
    counts = {"content_hash": 0, "finite_check": 0}
    real_key, real_isfinite = engine_module.image_key, torch.isfinite

    def content_hash(image):
        counts["content_hash"] += 1
        return real_key(image)

    def finite_check(tensor):
        counts["finite_check"] += tensor.ndim == 4  # an image [3, H, W, D], not the sampler's logits
        return real_isfinite(tensor)

    monkeypatch.setattr(engine_module, "image_key", content_hash)
    monkeypatch.setattr(engine_module.torch, "isfinite", finite_check)
    return counts


def test_follow_up_on_a_preprocessed_scan_reads_no_pixels(tiny_engine, counted, monkeypatch):
    tiny_engine.cache.clear()
    encodes = []
    real = tiny_engine.model.encode_images
    monkeypatch.setattr(tiny_engine.model, "encode_images", lambda x: encodes.append(1) or real(x))
    image = ct_image()
    settings = GenerationSettings(max_new_tokens=1)
    tiny_engine.answer(tiny_engine.image_tag(0) + "Describe the scan.", [image], settings)
    for _ in range(3):
        tiny_engine.answer(tiny_engine.image_tag(0) + "Is there a pleural effusion?", [image], settings)
    assert encodes == [1]
    assert counted == {"content_hash": 0, "finite_check": 0}


def test_raw_tensor_is_hashed_and_checked_once_then_found_by_its_pixels(tiny_engine, counted):
    tiny_engine.cache.clear()
    tensor = ct_image().tensor.contiguous()
    tiny_engine.encode_images([tensor])
    assert counted == {"content_hash": 1, "finite_check": 1}
    hits = tiny_engine.cache.hits
    tiny_engine.encode_images([tensor.clone()])  # same pixels, another tensor
    assert tiny_engine.cache.hits == hits + 1 and counted == {"content_hash": 2, "finite_check": 1}


def test_the_same_scan_made_twice_has_the_same_key():
    assert ct_image().key == ct_image().key


@pytest.mark.parametrize("change", ["one voxel", "geometry", "window", "depth", "interpolation"])
def test_anything_that_changes_what_the_model_sees_changes_the_key(change):
    array = ct_array()
    if change == "one voxel":
        array[3, 10, 10] += 1
        other = ct_image(array)
    elif change == "geometry":
        other = ct_image(geometry=np.diag([0.7, -0.7, 2.5, 1.0]))  # flipped left-right
    elif change == "window":
        other = ct_image(window="lung")
    elif change == "depth":
        other = ct_image(depth=8)
    else:
        other = ct_image(interpolation="linear")
    assert other.key != ct_image().key


def test_a_crop_is_known_apart_from_its_scan_and_from_other_crops():
    volume = volume_from_array(ct_array(), CT_GEOMETRY, name="ct")
    left, right = volume.crop((0, 0, 0), (8, 32, 32), "left"), volume.crop((0, 0, 32), (8, 32, 64), "right")
    keys = {preprocess(v, "soft_tissue").key for v in (volume, left, right)}
    assert len(keys) == 3
    assert preprocess(volume.crop((0, 0, 0), (8, 32, 32), "again"), "soft_tissue").key in keys


@pytest.mark.parametrize("shape", [(300, 64, 64), (9, 100, 130), (70, 600, 480), (1, 30, 20)])
def test_nearest_preprocess_equals_interpolating_the_windowed_volume(shape):
    """The fast path (pick voxels, then window those) gives exactly the reference tensor."""
    volume = volume_from_array(np.random.default_rng(1).integers(-1000, 2000, shape).astype(np.int16),
                               CT_GEOMETRY, name="ct")
    image = preprocess(volume, "soft_tissue")
    low, high = image.window["low"], image.window["high"]
    windowed = ((torch.from_numpy(volume.voxels) - low) / (high - low)).clamp(0, 1).permute(1, 2, 0)
    reference = torch.nn.functional.interpolate(windowed[None, None], size=tuple(image.resample["size"]))[0, 0]
    assert torch.equal(image.tensor[0], reference) and torch.equal(image.tensor[2], reference)
    assert not np.shares_memory(image.tensor.numpy(), volume.voxels)  # windowing never edits the scan
