"""Preview montage: every slice the model receives, one captioned block per image."""

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from RadFMSlicer.imaging import load_volume, preprocess, volume_from_array
from RadFMSlicer.preview import BLOCK_GAP, CAPTION_LINES, LINE_HEIGHT, TILE, TILE_GAP, render_montage
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
    assert Image.open(out).size == (w + 2 * BLOCK_GAP, 2 * BLOCK_GAP + CAPTION_LINES * LINE_HEIGHT + h + BLOCK_GAP)


def test_titles_must_match_images(tmp_path, ct_and_region):
    with pytest.raises(ValueError):
        render_montage(list(ct_and_region), tmp_path / "x.png", titles=["only one"])
