"""Preview montage: every slice the model receives, one captioned block per image."""

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from RadFMSlicer.imaging import load_volume, preprocess, volume_from_array
from RadFMSlicer.preview import BLOCK_GAP, CAPTION_LINES, LINE_HEIGHT, TILE, TILE_GAP, render_montage, slice_numbers
from RadFMSlicer.regions import region_from_box


def block_size(rows, cols, tile=TILE):
    return cols * tile + (cols - 1) * TILE_GAP, rows * tile + (rows - 1) * TILE_GAP


@pytest.fixture(scope="module")
def ct_and_region():
    vol = load_volume(get_testdata_file("CT_small.dcm"))
    region = region_from_box(vol, ijk_min=(30, 40, 0), ijk_max=(50, 60, 0), name="lesion")
    return preprocess(vol), preprocess(region.volume)


def test_ct_small_with_region_shows_every_slice_side_by_side(tmp_path, ct_and_region):
    main, region = ct_and_region
    out = render_montage([main, region], tmp_path / "m.png", titles=["CT", "lesion"])
    png = np.asarray(Image.open(out).convert("L"), dtype=float)
    w, h = block_size(2, 2)  # D = 4 -> 2 x 2 tiles per block
    top = 2 * BLOCK_GAP + CAPTION_LINES * LINE_HEIGHT
    assert png.shape == (top + h + BLOCK_GAP, 2 * w + 3 * BLOCK_GAP)
    for x0 in (BLOCK_GAP, 2 * BLOCK_GAP + w):  # each of the 8 tiles has image content
        for r in range(2):
            for c in range(2):
                y, x = top + r * (TILE + TILE_GAP), x0 + c * (TILE + TILE_GAP)
                assert png[y:y + TILE, x:x + TILE].std() > 20
    # the first tile is the model's slice 0, downscaled
    tile0 = png[top:top + TILE, BLOCK_GAP:BLOCK_GAP + TILE]
    assert tile0.mean() == pytest.approx(float(main.tensor[0, :, :, 0].mean()) * 255, abs=1.5)
    assert png[:top - BLOCK_GAP].max() > 200  # caption text drawn


def test_deeper_image_gets_a_bigger_grid(tmp_path):
    arr = np.random.default_rng(0).uniform(0, 100, size=(9, 16, 16)).astype(np.float32)
    img = preprocess(volume_from_array(arr))  # 9 slices -> D = 8 -> 3 x 3 grid, one cell empty
    out = render_montage([img], tmp_path / "d.png", tile=32)
    w, h = block_size(3, 3, tile=32)
    width, height = Image.open(out).size
    assert width == w + 2 * BLOCK_GAP
    assert height >= 2 * BLOCK_GAP + CAPTION_LINES * LINE_HEIGHT + h + BLOCK_GAP  # more when captions wrap


def test_titles_must_match_images(tmp_path, ct_and_region):
    with pytest.raises(ValueError):
        render_montage(list(ct_and_region), tmp_path / "x.png", titles=["only one"])


def test_a_small_preview_wraps_its_caption_instead_of_cutting_it(tmp_path, ct_and_region):
    title = "CT_small_with_a_long_descriptive_name.dcm (current study)"
    out = render_montage([ct_and_region[0]], tmp_path / "s.png", titles=[title], tile=32)  # a 66 px wide block
    png = np.asarray(Image.open(out).convert("L"))
    caption = png[BLOCK_GAP:png.shape[0] - BLOCK_GAP - block_size(2, 2, 32)[1] - BLOCK_GAP]
    text_rows = np.flatnonzero((caption > 150).any(axis=1))
    assert len(caption) > 6 * LINE_HEIGHT and text_rows.max() > 5 * LINE_HEIGHT  # all of it, on many lines


def test_tiles_are_numbered_with_the_scan_slice_they_show():
    arr = np.repeat(np.arange(30, dtype=np.float32)[:, None, None], 8, axis=1).repeat(8, axis=2)
    arr[:, 0, 0] += 0.25  # not one value per volume
    img = preprocess(volume_from_array(arr), "14.5,30")  # slice k -> (k + 0.5) / 30
    shown = [round(float(img.tensor[0, :, :, d].mean()) * 30 - 0.5) for d in range(img.tensor.shape[-1])]
    assert slice_numbers(img) == shown and len(shown) == 28


def test_a_region_preview_numbers_the_slices_of_the_whole_scan():
    vol = volume_from_array(np.random.default_rng(1).uniform(0, 1, (40, 16, 16)).astype(np.float32))
    region = region_from_box(vol, ijk_min=(2, 2, 20), ijk_max=(10, 10, 30), margin_mm=0)
    assert slice_numbers(preprocess(region.volume))[:1] == [20]


def test_previews_letter_the_patient_directions_beside_the_tiles(tmp_path, ct_and_region):
    out = render_montage([ct_and_region[0]], tmp_path / "l.png", edges=[("R", "L", "A", "P")])
    bare = render_montage([ct_and_region[0]], tmp_path / "b.png")
    lettered, plain = (np.asarray(Image.open(p).convert("L"), dtype=int) for p in (out, bare))
    w, h = block_size(2, 2)
    top = 2 * BLOCK_GAP + CAPTION_LINES * LINE_HEIGHT
    margins = {"R": lettered[top:top + h, :BLOCK_GAP], "L": lettered[top:top + h, BLOCK_GAP + w:],
               "A": lettered[top - BLOCK_GAP:top, BLOCK_GAP:BLOCK_GAP + w], "P": lettered[top + h:, BLOCK_GAP:BLOCK_GAP + w]}
    assert all(region.max() > 150 for region in margins.values())
    assert (lettered[top:top + h, BLOCK_GAP:BLOCK_GAP + w] == plain[top:top + h, BLOCK_GAP:BLOCK_GAP + w]).all()


def test_an_axial_scan_reads_right_left_anterior_posterior():
    from RadFMSlicer.ask import AskRequest, ImageInput, prepare

    prepared = prepare(AskRequest(task="report", images=[ImageInput(path=get_testdata_file("CT_small.dcm"))]))
    assert prepared.edges == [("R", "L", "A", "P")]


def test_a_full_size_tile_is_the_model_tensor_rounded_as_torch_rounds_it(tmp_path):
    """The preview draws the model's own values (made without torch on the CPU), not a lookalike."""
    voxels = np.random.default_rng(2).integers(-200, 300, (4, 64, 64), dtype=np.int16)
    image = preprocess(volume_from_array(voxels), "40,400")
    png = np.asarray(Image.open(render_montage([image], tmp_path / "m.png", tile=512)).convert("L"))
    expected = (image.tensor[0] * 255).round().byte().numpy()  # [512, 512, D]
    top = 2 * BLOCK_GAP + CAPTION_LINES * LINE_HEIGHT
    for d in range(4):  # a 2 x 2 block; below each tile's slice number
        y, x = top + d // 2 * (512 + TILE_GAP), BLOCK_GAP + d % 2 * (512 + TILE_GAP)
        np.testing.assert_array_equal(png[y + 20:y + 512, x:x + 512], expected[20:, :, d])
