"""Where the model looked: resampler attention from the encoding pass, mapped back onto the scan."""

import numpy as np
import pydicom.data
import pytest
import SimpleITK as sitk
import torch

from RadFMSlicer.attention import LABEL, patch_map, scan_map, write_scan_map
from RadFMSlicer.imaging import load_volume, preprocess, volume_from_array
from RadFMSlicer.model.resampler import PerceiverAttention

CT = pydicom.data.get_testdata_file("CT_small.dcm")


def test_asking_for_the_weights_leaves_the_output_bit_identical_and_they_are_a_softmax():
    torch.manual_seed(0)
    attn = PerceiverAttention(dim=48, heads=8, dim_head=8)
    media, latents = torch.randn(2, 40, 48), torch.randn(2, 32, 48)
    out, weights = attn(media, latents, need_weights=True)
    assert torch.equal(out, attn(media, latents))
    assert weights.shape == (2, 8, 32, 40) and bool((weights > 0).all())
    assert bool((weights.sum(-1) < 1).all())  # the rest of each row went to the latents themselves


@pytest.fixture
def fresh_engine(tiny_engine):
    from RadFMSlicer.engine import RadFMEngine

    return RadFMEngine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.files)


def test_attention_comes_from_the_encoding_pass_and_is_cached_with_the_tokens(fresh_engine, tiny_engine):
    image = preprocess(load_volume(CT))
    maps = fresh_engine.image_attention(image)
    layers = fresh_engine.model.dims.perceiver_layers
    assert maps.shape == (layers, 16, 16, 1)
    assert torch.allclose(maps.sum(dim=(1, 2, 3)), torch.ones(layers))  # each layer sums to 1 over the patches
    misses = fresh_engine.cache.misses
    tokens = fresh_engine.encode_images([image])  # the ask that follows: no second encode
    assert fresh_engine.cache.misses == misses and fresh_engine.cache.hits == 1
    plain = tiny_engine.model.encode_images(image.tensor[None]).reshape(tokens.shape)  # the SDPA path
    assert torch.equal(tokens, plain)  # the answer reads the image tokens it would have read without the map
    assert fresh_engine.image_attention(image) is maps  # cached
    assert patch_map(fresh_engine, image).sum() == pytest.approx(1.0, abs=1e-5)


def ras_centres(volume) -> np.ndarray:
    """RAS mm of every voxel centre of the original grid, ``[k, j, i, 3]``."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in volume.grid.shape], indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    return (ijk @ volume.ijk_to_ras.T)[..., :3]


def direction(columns, spacing=(1.0, 1.0, 1.0)):
    """ijk->RAS with direction columns (unit vectors for i, j, k) and spacing."""
    m = np.eye(4)
    m[:3, :3] = np.array(columns, float).T * spacing
    m[:3, 3] = (10.0, -20.0, 30.0)
    return m


DIRECTIONS = {
    "RAS": direction([(1, 0, 0), (0, 1, 0), (0, 0, 1)]),
    "LPS (DICOM axial)": direction([(-1, 0, 0), (0, -1, 0), (0, 0, 1)], (0.8, 0.8, 2.5)),
    "axial, inferior to superior flipped": direction([(1, 0, 0), (0, -1, 0), (0, 0, -1)], (0.7, 0.9, 3.0)),
    "sagittal acquisition": direction([(0, 1, 0), (0, 0, -1), (-1, 0, 0)], (1.0, 1.2, 2.0)),
    "coronal acquisition": direction([(-1, 0, 0), (0, 0, 1), (0, -1, 0)]),
}


@pytest.mark.parametrize("name", DIRECTIONS)
def test_a_marker_in_the_right_anterior_superior_corner_maps_back_to_that_corner(name):
    array = np.random.default_rng(0).random((6, 20, 24)).astype(np.float32)  # [k, j, i]
    volume = volume_from_array(array, DIRECTIONS[name])
    ras = ras_centres(volume)
    corner = np.unravel_index(np.argmax(ras.sum(-1)), array.shape)  # most right + anterior + superior voxel
    opposite = np.unravel_index(np.argmin(ras.sum(-1)), array.shape)
    # the display convention puts that corner at patch (row 0, col 0, slice 0)
    grid = np.zeros((16, 16, 2), np.float32)
    grid[0, 0, 0] = 1.0
    voxels = scan_map(grid, volume)
    assert voxels.shape == array.shape and voxels.max() == 1.0 and voxels.min() == 0.0
    assert voxels[corner] == 1.0 and voxels[opposite] == 0.0
    marked = ras[voxels > 0]
    assert (marked[:, 0] > np.median(ras[..., 0])).all() and (marked[:, 1] > np.median(ras[..., 1])).all()
    assert (marked[:, 2] >= np.median(ras[..., 2])).all()


@pytest.mark.parametrize("name", DIRECTIONS)
def test_inverse_of_preprocess_returns_a_marker_to_its_own_voxels(name):
    array = np.zeros((6, 20, 24), np.float32)
    array[4:6, 13:20, 2:5] = 100.0  # somewhere off-centre, on the original grid
    volume = volume_from_array(array, DIRECTIONS[name])
    tensor = preprocess(volume, "0,100").tensor[0]  # [512, 512, D]
    bright = tensor.reshape(16, 32, 16, 32, tensor.shape[-1] // 4, 4).amax(dim=(1, 3, 5)).numpy()  # per patch
    back = scan_map((bright > 0.5).astype(np.float32), volume)
    assert (back[array > 0] == 1.0).all()  # every marked voxel is inside a patch that saw it
    assert back[array == 0].sum() < back.size / 8  # and the rest of the scan stays unmarked


def test_the_map_is_written_on_the_scans_own_grid(tmp_path):
    volume = load_volume(CT)
    grid = np.random.default_rng(0).random((16, 16, 1)).astype(np.float32)
    path = write_scan_map(tmp_path / "attention.nii.gz", scan_map(grid, volume), volume)
    written, source = sitk.ReadImage(str(path)), sitk.ReadImage(CT)
    assert written.GetSize()[:2] == source.GetSize()[:2]
    assert np.allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
    assert np.allclose(written.GetSpacing()[:2], source.GetSpacing()[:2])
    assert np.allclose(np.reshape(written.GetDirection(), (3, 3))[:2, :2],
                       np.reshape(source.GetDirection(), (3, 3))[:2, :2], atol=1e-6)
    assert LABEL in written.GetMetaData("descrip")


def test_radfm_ask_writes_the_map_on_the_scans_grid_and_names_it(capsys, tiny_checkpoint, tmp_path):
    import json

    from RadFMSlicer.cli import main

    out = tmp_path / "ct-attention.nii.gz"
    code = main(["ask", "--checkpoint", str(tiny_checkpoint), "--image", CT, "--task", "report",
                 "--max-new-tokens", "3", "--attention", str(out), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["provenance"]["attention"]["file"] == str(out) and result["provenance"]["attention"]["label"] == LABEL
    written, source = sitk.ReadImage(str(out)), sitk.ReadImage(CT)
    assert written.GetSize() == source.GetSize() and np.allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
    voxels = sitk.GetArrayFromImage(written)
    assert voxels.max() == pytest.approx(1.0) and voxels.min() >= 0.0


def test_radfm_ask_attention_reads_the_scan_once(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    """The map goes onto the grid of the scan the answer was prepared from, not onto a second read of it."""
    from RadFMSlicer.cli import main
    from RadFMSlicer.imaging import io

    reads, real = [], io.load_volume
    monkeypatch.setattr(io, "load_volume", lambda path, **kwargs: reads.append(path) or real(path, **kwargs))
    out = tmp_path / "ct-attention.nii.gz"
    assert main(["ask", "--checkpoint", str(tiny_checkpoint), "--image", CT, "--max-new-tokens", "1",
                 "--attention", str(out)]) == 0
    assert reads == [CT] and sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(CT).GetSize()


def test_preview_overlays_the_attention_on_the_thumbnails_and_labels_it(capsys, tiny_checkpoint, tmp_path):
    from PIL import Image

    from RadFMSlicer.cli import main
    from RadFMSlicer.preview import BLOCK_GAP, LINE_HEIGHT, OVERLAY_CAPTION, TILE, render_montage

    image = preprocess(load_volume(CT))  # D = 4: a 2 x 2 block of tiles
    heat = np.zeros((512, 512, 4), np.float32)
    heat[:256, :256, 0] = 1.0  # the top-left quarter of slice 0
    plain = np.asarray(Image.open(render_montage([image], tmp_path / "plain.png")).convert("RGB"), float)
    tinted = np.asarray(Image.open(render_montage([image], tmp_path / "heat.png", overlays=[heat])).convert("RGB"), float)
    top_plain, top_tinted = 2 * BLOCK_GAP + 3 * LINE_HEIGHT, 2 * BLOCK_GAP + 4 * LINE_HEIGHT  # one caption line more
    a = plain[top_plain:top_plain + TILE, BLOCK_GAP:BLOCK_GAP + TILE]
    b = tinted[top_tinted:top_tinted + TILE, BLOCK_GAP:BLOCK_GAP + TILE]
    quarter = TILE // 2
    assert (b[:quarter, :quarter, 2] < b[:quarter, :quarter, 0]).all()  # yellow over the gray: blue drops
    assert (b[quarter:, quarter:] == a[quarter:, quarter:]).all()  # untouched where the map is 0
    assert LABEL in OVERLAY_CAPTION
    out = tmp_path / "cli.png"
    assert main(["preview", "--image", CT, "--out", str(out), "--attention", "--checkpoint", str(tiny_checkpoint)]) == 0
    assert Image.open(out).size[1] == Image.open(tmp_path / "heat.png").size[1]  # the labelled layout


def test_attention_bad_inputs_are_one_line_errors(capsys, tiny_checkpoint, tmp_path):
    from RadFMSlicer.cli import main

    assert main(["ask", "--checkpoint", str(tiny_checkpoint), "--image", CT, "--attention", str(tmp_path / "map.txt")]) == 2
    assert "name the map .nii.gz" in capsys.readouterr().err
    assert main(["preview", "--image", CT, "--out", str(tmp_path / "p.png"), "--attention"]) == 2
    assert "preview --attention needs --checkpoint" in capsys.readouterr().err


def test_an_attention_map_the_disk_cannot_hold_is_one_line_and_leaves_no_cut_file(tmp_path, monkeypatch):
    """The worker's map for the viewer, on a full disk: a StorageError saying so (the panel shows it), and no
    half-written .npy for the viewer to read as a map."""
    import errno
    import os

    from scripted_worker import _PeakedAttention

    from RadFMSlicer import storage
    from RadFMSlicer.ask import AskRequest, prepare
    from RadFMSlicer.attention import write_npy_for_ask

    prepared = prepare(AskRequest.from_dict({"question": "Is there fluid", "images": [{"path": CT}]}))
    assert np.load(write_npy_for_ask(_PeakedAttention(), prepared, tmp_path)["file"]).ndim == 3

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.os, "fsync", disk_full)
    before = set(tmp_path.iterdir())
    with pytest.raises(storage.StorageError, match="No space left on device.*nothing was written"):
        write_npy_for_ask(_PeakedAttention(), prepared, tmp_path)
    assert set(tmp_path.iterdir()) == before
