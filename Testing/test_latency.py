"""What a radiologist feels between questions: a follow-up reads no pixels again.

An image is known by what made it (its source's fingerprint, taken once when the volume
is built, plus the recipe), so asking again about an encoded scan hashes, checks and
preprocesses nothing; anything that changes the pixels the model sees changes the key.
"""

import gc
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from RadFMSlicer import engine as engine_module
from RadFMSlicer.generation import GenerationSettings
from RadFMSlicer.imaging import preprocess, volume_from_array

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "RadFMModule"))  # the module's Lib, as in Slicer
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


@pytest.mark.parametrize("shape, dtype", [((300, 64, 64), np.int16), ((9, 100, 130), np.int16),
                                          ((70, 600, 480), np.int16), ((1, 30, 20), np.int16),
                                          ((9, 40, 40), np.uint8), ((9, 40, 40), np.int32), ((9, 40, 40), np.float32)])
def test_nearest_preprocess_equals_interpolating_the_windowed_volume(shape, dtype):
    """The fast path (pick slices, then window those one by one) gives exactly the reference tensor."""
    values = np.random.default_rng(1).integers(-1000, 2000, shape)
    if dtype == np.uint8:
        values = values % 256
    elif dtype == np.int32:
        values = values * 40_001 + 2**24 + 1  # past float32's exact integers: rounded as torch rounds them
    elif dtype == np.float32:
        values = values + np.random.default_rng(2).random(shape)
    volume = volume_from_array(values.astype(dtype), CT_GEOMETRY, name="ct")
    window = "soft_tissue" if dtype != np.int32 else "37000000,120000000"
    image = preprocess(volume, window)
    low, high = image.window["low"], image.window["high"]
    windowed = ((torch.from_numpy(np.ascontiguousarray(volume.voxels)).float() - low) / (high - low)).clamp(0, 1)
    windowed = windowed.permute(1, 2, 0)
    reference = torch.nn.functional.interpolate(windowed[None, None], size=tuple(image.resample["size"]))[0, 0]
    assert torch.equal(image.tensor[0], reference) and torch.equal(image.tensor[2], reference)
    assert not np.shares_memory(image.tensor.numpy(), volume.voxels)  # windowing never edits the scan


# ------------------------------------------------------------------ viewer -> worker
def handed_over(tmp_path, array, window="40,400") -> dict:
    """An image as the panel hands it to the worker: the viewer's array saved once as .npy."""
    path = tmp_path / "volume.npy"
    if not path.exists():
        np.save(path, array)
    return {"array": str(path), "ijk_to_ras": CT_GEOMETRY.tolist(), "name": "ct", "window": window}


@pytest.fixture
def made(monkeypatch):
    """Counts of scans read and model images made (what a follow-up must not redo)."""
    from RadFMSlicer import ask

    counts = {"loads": 0, "preprocessed": 0}
    real_load, real_preprocess = ask.ImageInput.load, ask.preprocess

    def load(item):
        counts["loads"] += 1
        return real_load(item)

    def preprocess_(*args, **kwargs):
        counts["preprocessed"] += 1
        return real_preprocess(*args, **kwargs)

    monkeypatch.setattr(ask.ImageInput, "load", load)
    monkeypatch.setattr(ask, "preprocess", preprocess_)
    return counts


def prepare_from_json(images_json, cache):
    from RadFMSlicer.ask import AskRequest, ImageInput, prepare

    request = AskRequest(question="Is there a nodule?", images=[ImageInput.from_json(i) for i in images_json])
    return prepare(request, images=cache)


def test_follow_ups_about_a_handed_over_scan_read_and_preprocess_nothing(tmp_path, made):
    from RadFMSlicer.image_cache import ImageCache

    cache, array = ImageCache(), ct_array()
    first = prepare_from_json([handed_over(tmp_path, array)], cache)
    for _ in range(3):
        again = prepare_from_json([handed_over(tmp_path, array)], cache)
    assert made == {"loads": 1, "preprocessed": 1}
    assert again.model_images[0] is first.model_images[0]


def test_another_window_is_preprocessed_again_without_reading_the_scan(tmp_path, made):
    from RadFMSlicer.image_cache import ImageCache

    cache, array = ImageCache(), ct_array()
    soft = prepare_from_json([handed_over(tmp_path, array, "40,400")], cache).model_images[0]
    lung = prepare_from_json([handed_over(tmp_path, array, "-600,1500")], cache).model_images[0]
    assert made == {"loads": 1, "preprocessed": 2}
    assert lung.key != soft.key and not torch.equal(lung.tensor, soft.tensor)


def test_a_rewritten_file_is_read_again(tmp_path, made):
    from RadFMSlicer.image_cache import ImageCache

    cache, array = ImageCache(), ct_array()
    before = prepare_from_json([handed_over(tmp_path, array)], cache).model_images[0]
    changed = array.copy()
    changed[:, :32] = 1000  # the user edited the volume; the file is written again
    path = tmp_path / "volume.npy"
    np.save(path, changed)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a later modification time
    after = prepare_from_json([handed_over(tmp_path, changed)], cache).model_images[0]
    assert made == {"loads": 2, "preprocessed": 2}
    assert after.key != before.key and not torch.equal(after.tensor, before.tensor)


def dicom_series(folder: Path, slices: int = 3) -> Path:
    """A CT series folder: pydicom's CT_small as ``slices`` files 5 mm apart."""
    import pydicom
    import pydicom.data

    folder.mkdir()
    for k in range(slices):
        ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID, ds.InstanceNumber = f"{ds.SOPInstanceUID}.{k + 1}", k + 1
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 5 * k]
        ds.save_as(folder / f"slice{k}.dcm")
    return folder


def test_a_question_about_a_known_dicom_folder_looks_at_its_files_once(tmp_path, tiny_engine, monkeypatch):
    """A follow-up (or a question about a series encoded ahead) knows the series unchanged by one walk
    of its folder and one stat of each file, for its scan and its model image alike."""
    from RadFMSlicer.worker.server import WorkerServer

    events = []
    server = WorkerServer(lambda request_id, event: events.append((request_id, event)), heartbeat_s=0)
    server.engine = tiny_engine
    folder = dicom_series(tmp_path / "series")
    server.op_encode("ahead", {"id": "ahead", "op": "encode", "images": [str(folder)]})  # reads the series
    walks, stats, real_walk, real_stat = [], [], os.walk, os.stat
    monkeypatch.setattr(os, "walk", lambda top, *args, **kw: walks.append(str(top)) or real_walk(top, *args, **kw))
    monkeypatch.setattr(os, "stat", lambda path, *args, **kw: stats.append(str(path)) or real_stat(path, *args, **kw))
    for n in range(2):
        server.op_ask(f"q{n}", {"id": f"q{n}", "op": "ask", "question": "Is there a nodule?", "images": [str(folder)],
                                "max_new_tokens": 1})
    assert [event.kind for _, event in events if event.final] == ["done"] * 3
    assert walks == [str(folder)] * 2
    files = sorted(str(folder / f"slice{k}.dcm") for k in range(3))
    assert sorted(path for path in stats if path.startswith(str(folder) + os.sep)) == sorted(files * 2)


def test_a_one_off_question_stats_no_series_file_and_reads_no_preview_back(tmp_path, monkeypatch):
    """The CLI keeps nothing between questions, so it takes no fingerprint of a DICOM series (a stat of
    every file) and reads no montage back for a previews cache that would drop it; a worker's cache does both."""
    from RadFMSlicer import image_cache
    from RadFMSlicer.ask import AskRequest, ImageInput, prepare

    folder = dicom_series(tmp_path / "series")
    fingerprinted, read_back = [], []
    real_state, real_read = image_cache._file_state, Path.read_bytes
    monkeypatch.setattr(image_cache, "_file_state", lambda path: fingerprinted.append(path) or real_state(path))
    monkeypatch.setattr(Path, "read_bytes", lambda self: read_back.append(self.suffix) or real_read(self))
    request = AskRequest(question="Is there a nodule?", images=[ImageInput(path=str(folder))],
                         preview_dir=str(tmp_path / "previews"))
    one_off = prepare(request)
    assert fingerprinted == [] and ".png" not in read_back
    assert Path(one_off.records[0].preview_png).stat().st_size > 0
    kept = image_cache.ImageCache()
    prepare(request, images=kept)
    assert fingerprinted == [str(folder)] and read_back.count(".png") == 1 and len(kept.previews) == 1


class OneScanScene:
    """The viewer with one CT node (the assistant's Scene protocol, what build_ask reads)."""

    def __init__(self, array):
        self.array, self.version = array, "1"

    def volume(self, volume_id):
        from RadFMModuleLib.assistant import VolumeData

        return VolumeData("CT", self.array, CT_GEOMETRY, (40.0, 400.0), self.version)

    def regions(self):
        return []


def test_the_viewer_hands_a_volume_over_once_per_change_as_int16(tmp_path):
    from RadFMModuleLib.assistant import Assistant, Selection
    from RadFMModuleLib.settings import ModelSettings

    scene = OneScanScene(ct_array())
    assistant = Assistant(scene, start_client=None, settings=ModelSettings(checkpoint_folder=str(tmp_path)))
    files = [assistant.build_ask("vqa", q, Selection("ct"))["images"][0]["array"] for q in ("Nodule?", "Effusion?")]
    assert files[0] == files[1]  # the second question hands nothing over
    handed = np.load(files[0])
    assert handed.dtype == np.int16 and np.array_equal(handed, scene.array)
    scene.array = scene.array.copy()
    scene.array[0, 0, 0] += 7
    scene.version = "2"  # the node's voxels changed
    changed = assistant.build_ask("vqa", "Nodule?", Selection("ct"))["images"][0]["array"]
    assert changed != files[0] and np.array_equal(np.load(changed), scene.array)


def test_the_hand_over_lives_in_memory_and_is_removed_when_replaced_or_the_panel_closes(tmp_path, monkeypatch):
    from RadFMModuleLib import assistant as assistant_module
    from RadFMModuleLib.settings import ModelSettings

    memory = tmp_path / "shm"
    memory.mkdir()
    monkeypatch.setattr(assistant_module, "MEMORY_FOLDER", str(memory))
    scene = OneScanScene(ct_array())
    assistant = assistant_module.Assistant(scene, start_client=None,
                                           settings=ModelSettings(checkpoint_folder=str(tmp_path)))
    ask = lambda: assistant.build_ask("vqa", "Nodule?", assistant_module.Selection("ct"))["images"][0]["array"]
    first = ask()
    assert Path(first).is_relative_to(memory)  # written to RAM, not to the disk
    scene.version = "2"
    second = ask()
    assert Path(second).is_relative_to(memory) and not os.path.exists(first)  # the replaced one is gone
    assistant.close()
    assert list(memory.iterdir()) == []  # nothing left behind
    dropped = assistant_module.Assistant(OneScanScene(ct_array()), start_client=None,
                                         settings=ModelSettings(checkpoint_folder=str(tmp_path)))
    dropped.build_ask("vqa", "Nodule?", assistant_module.Selection("ct"))
    assert len(list(memory.iterdir())) == 1
    del dropped  # a panel gone without close() (or Python exiting) leaves no RAM taken either
    gc.collect()
    assert list(memory.iterdir()) == []


def test_without_a_memory_folder_the_hand_over_goes_to_the_temp_folder(tmp_path, monkeypatch):
    from RadFMModuleLib import assistant as assistant_module
    from RadFMModuleLib.settings import ModelSettings

    monkeypatch.setattr(assistant_module, "MEMORY_FOLDER", str(tmp_path / "absent"))
    scene = OneScanScene(ct_array())
    assistant = assistant_module.Assistant(scene, start_client=None,
                                           settings=ModelSettings(checkpoint_folder=str(tmp_path)))
    path = assistant.build_ask("vqa", "Nodule?", assistant_module.Selection("ct"))["images"][0]["array"]
    assert np.array_equal(np.load(path), scene.array) and os.path.dirname(path) == assistant._files
    assistant.close()
    assert not os.path.exists(path)
    dropped = assistant_module.Assistant(scene, start_client=None,
                                         settings=ModelSettings(checkpoint_folder=str(tmp_path)))
    path = dropped.build_ask("vqa", "Nodule?", assistant_module.Selection("ct"))["images"][0]["array"]
    del dropped  # a panel gone without close() (or Python exiting) leaves no scan on the disk either
    gc.collect()
    assert not os.path.exists(os.path.dirname(path))


@pytest.mark.parametrize("slices", [12, 80])  # 12: every slice is used; 80: 64 are picked
def test_a_handed_over_scan_is_read_in_place_and_the_model_sees_the_same(tmp_path, slices):
    from RadFMSlicer.ask import ImageInput

    array = ct_array(slices=slices)
    item = ImageInput.from_json(handed_over(tmp_path, array))
    volume = item.load()
    assert np.shares_memory(volume.voxels, item.array)  # the mapped file, no copy of the voxels
    np.testing.assert_array_equal(volume.voxels, array[::-1])
    in_memory = volume_from_array(array, CT_GEOMETRY, name="ct")
    assert volume.fingerprint == in_memory.fingerprint
    for window, interpolation in (("40,400", "nearest"), ("40,400", "linear"), (None, "nearest")):
        mapped, copied = (preprocess(v, window, interpolation=interpolation) for v in (volume, in_memory))
        assert torch.equal(mapped.tensor, copied.tensor) and mapped.key == copied.key


def test_an_int16_scan_is_kept_int16_and_preprocessed_from_its_own_values():
    array = ct_array()
    volume = volume_from_array(array, CT_GEOMETRY, name="ct")
    assert volume.voxels.dtype == np.int16 and volume.voxels.nbytes == array.nbytes  # no float copy of the scan
    np.testing.assert_array_equal(volume.voxels, array[::-1])  # superior slice first, values unchanged
    for interpolation in ("nearest", "linear"):
        image = preprocess(volume, "40,400", interpolation=interpolation)
        reference = preprocess(volume_from_array(array.astype(np.float32), CT_GEOMETRY, name="ct"), "40,400",
                               interpolation=interpolation)
        assert torch.equal(image.tensor, reference.tensor)


def test_a_gray_volume_seen_as_three_channels_encodes_like_its_full_copy(engine):
    """The encoder embeds preprocess's 3-channel view from one channel: same tokens, a third of the work."""
    view = torch.rand(1, 1, 64, 64, 8).expand(1, 3, -1, -1, -1)  # channels share memory, as preprocess makes them
    with torch.inference_mode():
        shared = engine.model.encode_images(view)
        full = engine.model.encode_images(view.contiguous())
    torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-4)


def test_a_scan_encoded_ahead_is_asked_about_without_reading_or_encoding_it_again(tmp_path, tiny_engine, made,
                                                                                  monkeypatch):
    """The panel's prepare-ahead: the worker's encode op fills the caches the question then finds."""
    from RadFMSlicer.worker.server import WorkerServer

    events = []
    server = WorkerServer(lambda request_id, event: events.append((request_id, event)), heartbeat_s=0)
    server.engine = tiny_engine
    tiny_engine.cache.clear()
    encodes = []
    real = tiny_engine.model.encode_images
    monkeypatch.setattr(tiny_engine.model, "encode_images", lambda x: encodes.append(1) or real(x))
    image = handed_over(tmp_path, ct_array())
    server.op_encode("ahead", {"id": "ahead", "op": "encode", "images": [image]})
    assert made == {"loads": 1, "preprocessed": 1} and encodes == [1]
    server.op_ask("q", {"id": "q", "op": "ask", "question": "Is there a nodule?", "images": [image],
                        "max_new_tokens": 1})
    (final,) = [event for request_id, event in events if request_id == "q" and event.final]
    assert final.kind == "done" and final.data["turn"]["images"][0]["source"] == "ct"
    assert made == {"loads": 1, "preprocessed": 1} and encodes == [1]
