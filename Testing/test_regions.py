"""Regions: masks and boxes -> close-up crop, size, volume, side, and the prompt sentence."""

import numpy as np
import pytest
import SimpleITK as sitk

from RadFMSlicer.errors import ImageError
from RadFMSlicer.imaging import LPS_TO_RAS, load_volume, preprocess, volume_from_array
from RadFMSlicer.regions import load_mask, region_from_box, region_from_mask

SHAPE = (20, 60, 80)  # k, j, i
SPACING = (0.8, 0.8, 2.5)  # i, j, k
ORIGIN = (-31.6, -20.0, -10.0)  # LPS; puts x = 0 in the middle of the right-left field of view
LESION = (slice(5, 10), slice(10, 20), slice(5, 15))  # k, j, i: small i = patient right


def ijk_to_lps(direction=np.eye(3), spacing=SPACING, origin=ORIGIN):
    m = np.eye(4)
    m[:3, :3] = direction * np.asarray(spacing)
    m[:3, 3] = origin
    return m


def mr_like(shape=SHAPE, blob=LESION):
    arr = np.random.default_rng(0).uniform(50, 150, size=shape).astype(np.float32)
    arr[blob] = 1000
    return arr


@pytest.fixture
def vol():
    return volume_from_array(mr_like(), LPS_TO_RAS @ ijk_to_lps(), name="mr")


def mask_of(blob, shape=SHAPE, value=1):
    mask = np.zeros(shape, np.uint8)
    mask[blob] = value
    return mask


def test_mask_region_crop_size_volume_and_side(vol):
    region = region_from_mask(vol, mask_of(LESION), name="lesion")
    # display slices run superior->inferior: k 5..9 -> slices 10..14; 10 mm margin = 4 slices / 13 pixels
    assert region.crop_box == ((6, 0, 0), (19, 33, 28))
    assert region.volume.shape == (13, 33, 28)
    np.testing.assert_array_equal(region.volume.voxels, vol.voxels[6:19, 0:33, 0:28])
    assert region.extent_by_axis == pytest.approx({"SI": 12.5, "AP": 8.0, "RL": 8.0})
    assert region.volume_ml == pytest.approx(0.8)
    assert region.side == "right"
    assert region.center_ras[0] == pytest.approx(24.0)  # RAS +x = patient right
    assert region.facts() == ('The second image is a close-up of the marked region "lesion": '
                              "about 8 x 8 x 13 mm (RL x AP x SI), volume 0.8 mL, in the right side of the scan; "
                              "the image shows 22 x 26 x 33 mm of the scan around it.")  # 28 x 33 x 13 voxels
    assert region.facts(ordinal="third").startswith("The third image")


def test_region_image_uses_the_parent_window(vol):
    parent = preprocess(vol)
    region = preprocess(region_from_mask(vol, mask_of(LESION)).volume)
    assert parent.window["mode"] == "percentile" and region.window == parent.window
    assert region.crop_box == ((6, 0, 0), (19, 33, 28))
    assert region.tensor.shape == (3, 512, 512, 12)


def test_region_reuses_an_explicit_parent_window(vol):
    parent = preprocess(vol, "brain")
    crop = region_from_mask(vol, mask_of(LESION)).volume
    region = preprocess(crop, parent.window)
    assert (region.window["low"], region.window["high"]) == (0, 80)
    assert float(region.tensor.min()) == pytest.approx(crop.voxels.min() / 80)  # background 50..150
    assert float(region.tensor.max()) == 1.0


@pytest.mark.parametrize("columns, side", [(slice(70, 76), "left"), (slice(37, 43), "midline")])
def test_side_relative_to_mid_sagittal_plane(vol, columns, side):
    assert region_from_mask(vol, mask_of((slice(5, 10), slice(10, 20), columns))).side == side


def test_label_selects_one_structure(vol):
    mask = mask_of(LESION) + mask_of((slice(0, 2), slice(40, 50), slice(60, 70)), value=2)
    region = region_from_mask(vol, mask, label=2, margin_mm=0)
    assert region.crop_box == ((18, 40, 60), (20, 50, 70)) and region.side == "left"
    with pytest.raises(ImageError, match=r"Label 3 is not in the mask.*labels present: 1, 2"):
        region_from_mask(vol, mask, label=3)


def test_empty_or_misfit_mask_is_refused(vol):
    with pytest.raises(ImageError, match="mask for region 'lesion' is empty"):
        region_from_mask(vol, np.zeros(SHAPE), name="lesion")
    with pytest.raises(ImageError, match=r"does not match the grid"):
        region_from_mask(vol, np.ones((20, 60, 79)))


def lesion_corners_ijk():
    return (5, 10, 5), (14, 19, 9)  # inclusive voxel indices (i, j, k)


def test_ras_and_ijk_boxes_match_the_mask_region(vol):
    by_mask = region_from_mask(vol, mask_of(LESION))
    lo, hi = lesion_corners_ijk()
    ras = [tuple((vol.ijk_to_ras @ [*c, 1])[:3]) for c in (lo, hi)]
    for region in (region_from_box(vol, ras_min=ras[0], ras_max=ras[1], name="roi"),
                   region_from_box(vol, ras[1], ras[0], name="roi"),  # corners in any order
                   region_from_box(vol, ijk_min=lo, ijk_max=hi, name="roi")):
        assert region.crop_box == by_mask.crop_box
        assert region.extent_mm == pytest.approx(by_mask.extent_mm)
        assert region.volume_ml is None and region.side == "right"
        assert "mL" not in region.facts() and '"roi"' in region.facts()


def test_box_partly_outside_is_clipped_and_noted(vol):
    region = region_from_box(vol, ijk_min=(-10, 10, 5), ijk_max=(14, 19, 9), margin_mm=0)
    assert region.crop_box == ((10, 10, 0), (15, 20, 15))
    assert region.extent_by_axis["RL"] == pytest.approx(15 * 0.8)
    assert any("clipped" in n for n in region.notes) and any("clipped" in n for n in region.volume.notes)


def test_a_box_reaching_near_the_float_limit_is_clipped_without_numpy_warnings(vol, recwarn):
    region = region_from_box(vol, ijk_min=(-1e308, 10, 5), ijk_max=(1e308, 19, 9), margin_mm=0)
    assert region.crop_box == ((10, 10, 0), (15, 20, 80))
    assert region.notes == ["box IJK [-1e+308, 10, 5]..[1e+308, 19, 9] clipped to the volume"]
    assert not recwarn.list, [f"{w.message} ({w.filename}:{w.lineno})" for w in recwarn.list]
    with pytest.raises(ImageError, match=r"Box for region 'far' \(RAS \[-1.7e\+308, 0, 0\]\.\.\[1.7e\+308, 5, 5\]\) "
                                         "is too far out to place on the volume mr"):
        region_from_box(vol, ras_min=(-1.7e308, 0, 0), ras_max=(1.7e308, 5, 5), name="far")
    assert not recwarn.list


def test_box_outside_or_malformed_is_refused(vol):
    with pytest.raises(ImageError, match="entirely outside the volume"):
        region_from_box(vol, ras_min=(500, 500, 500), ras_max=(600, 600, 600), name="far")
    with pytest.raises(ImageError, match="either ras_min and ras_max, or ijk_min and ijk_max"):
        region_from_box(vol, ras_min=(0, 0, 0), ras_max=(1, 1, 1), ijk_min=(0, 0, 0), ijk_max=(1, 1, 1))
    with pytest.raises(ImageError, match="3 numbers"):
        region_from_box(vol, ras_min=(0, 0), ras_max=(1, 1, 1))
    with pytest.raises(ImageError, match="margin"):
        region_from_box(vol, ijk_min=(0, 0, 0), ijk_max=(1, 1, 1), margin_mm=-1)


def test_mask_in_a_sagittal_acquisition_lands_on_the_same_anatomy():
    sagittal = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)  # i: A->P, j: S->I, k: R->L
    blob = (slice(3, 6), slice(10, 14), slice(20, 25))
    m = ijk_to_lps(sagittal, spacing=(0.5, 0.7, 3.0))
    vol = volume_from_array(mr_like((12, 30, 40), blob), LPS_TO_RAS @ m)
    region = region_from_mask(vol, mask_of(blob, (12, 30, 40)), margin_mm=0)
    assert region.volume.shape == (4, 5, 3) and (region.volume.voxels == 1000).all()
    centre = np.mean([(LPS_TO_RAS @ m @ [i, j, k, 1])[:3] for k in range(3, 6) for j in range(10, 14)
                      for i in range(20, 25)], axis=0)
    np.testing.assert_allclose(region.center_ras, centre, atol=1e-9)
    assert region.extent_by_axis == pytest.approx({"SI": 4 * 0.7, "AP": 5 * 0.5, "RL": 3 * 3.0})


def write(path, arr, spacing=SPACING, origin=ORIGIN, direction=np.eye(3)):
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(np.asarray(direction, float).ravel().tolist())
    sitk.WriteImage(image, str(path))
    return path


def test_load_mask_on_the_same_grid(tmp_path):
    vol = load_volume(write(tmp_path / "v.nrrd", mr_like()))
    mask = load_mask(write(tmp_path / "m.nrrd", mask_of(LESION)), vol)
    np.testing.assert_array_equal(mask, mask_of(LESION))
    assert region_from_mask(vol, mask).crop_box == ((6, 0, 0), (19, 33, 28))


def test_load_mask_resamples_another_grid_of_the_same_space(tmp_path):
    vol = load_volume(write(tmp_path / "v.nrrd", mr_like()))
    # the same voxels stored right-to-left flipped: origin at the other end of the i axis
    origin = (ORIGIN[0] + (SHAPE[2] - 1) * SPACING[0], *ORIGIN[1:])
    path = write(tmp_path / "m.nii.gz", mask_of(LESION)[:, :, ::-1].copy(), origin=origin,
                 direction=np.diag([-1.0, 1.0, 1.0]))
    np.testing.assert_array_equal(load_mask(path, vol), mask_of(LESION))


def test_a_label_map_on_another_grid_is_resampled_by_position_and_noted(tmp_path):
    """A 16x32x8 label map with the scan's voxel size and origin covers the scan's first 16 columns."""
    scan, label_map = np.zeros((8, 32, 32), np.float32), np.zeros((8, 32, 16), np.uint8)
    scan[2:4, 10:20, 3:7] = label_map[2:4, 10:20, 3:7] = 1
    scan[0, 0, 0] = 2  # some contrast
    vol = load_volume(write(tmp_path / "scan.nii.gz", scan, spacing=(1, 1, 1), origin=(0, 0, 0)))
    region = region_from_mask(vol, write(tmp_path / "mask.nii.gz", label_map, spacing=(1, 1, 1), origin=(0, 0, 0)))
    expected = region_from_mask(vol, scan == 1)
    assert region.crop_box == expected.crop_box and region.volume_ml == expected.volume_ml
    note = ("label map mask.nii.gz is on another grid (16x32x8 voxels of 1x1x1 mm) than the scan "
            "(32x32x8 voxels of 1x1x1 mm): resampled onto the scan's grid by position (nearest neighbour)")
    assert region.notes == [note] and note in region.volume.notes
    assert region_from_mask(vol, write(tmp_path / "same.nii.gz", scan.astype(np.uint8), spacing=(1, 1, 1),
                                       origin=(0, 0, 0))).notes == []


def test_load_mask_refuses_missing_or_non_overlapping_label_maps(tmp_path):
    vol = load_volume(write(tmp_path / "v.nrrd", mr_like()))
    with pytest.raises(ImageError, match="not found"):
        load_mask(tmp_path / "none.nrrd", vol)
    far = write(tmp_path / "far.nrrd", mask_of(LESION), origin=(900.0, 900.0, 900.0))
    with pytest.raises(ImageError, match="does not overlap"):
        load_mask(far, vol)


def test_a_regions_record_note_is_readable_text_not_a_python_dict():
    """--json's images[].notes for a box: the region in words, as a reader of the JSON sees it."""
    from pydicom.data import get_testdata_file

    from RadFMSlicer.ask import AskRequest, ImageInput, RegionInput, prepare

    request = AskRequest(task="report", images=[ImageInput(path=get_testdata_file("CT_small.dcm"))],
                         regions=[RegionInput(name="box 1", box_ijk=[[10, 20, 0], [29, 49, 0]], margin_mm=0)])
    (note,) = [n for n in prepare(request).records[1].notes if n.startswith("region: ")]
    assert note == ('region: "box 1", 13.2 x 19.8 x 5 mm (RL x AP x SI), centre RAS (145.2, 156.2, -75.7) mm, '
                    "side: right, close-up of slices 0-0, rows 20-49, columns 10-29 of the scan as shown "
                    "(13.2 x 19.8 x 5 mm)")


def test_a_box_over_the_whole_slice_is_told_as_the_whole_scan_not_a_close_up():
    """A --box-ijk over all of CT_small (128 x 128 pixels of 0.66 mm): the model is told what it sees."""
    from pydicom.data import get_testdata_file

    vol = load_volume(get_testdata_file("CT_small.dcm"))
    region = region_from_box(vol, ijk_min=(0, 0, 0), ijk_max=(127, 127, 0), name="box 1")
    assert region.facts() == ('The second image is the whole scan again, not a close-up: the marked region "box 1" '
                              "is about 85 x 85 x 5 mm (RL x AP x SI), near the midline of the scan.")
    assert region.describe().endswith("side: midline, the whole scan, not a close-up (slices 0-0, rows 0-127, "
                                      "columns 0-127 of the scan as shown)")
    small = region_from_box(vol, ijk_min=(60, 60, 0), ijk_max=(65, 65, 0), name="box 2")
    assert small.facts().endswith("about 4 x 4 x 5 mm (RL x AP x SI), near the midline of the scan; the image "
                                  "shows 25 x 25 x 5 mm of the scan around it.")


def test_a_picture_without_a_size_in_mm_has_its_region_told_in_pixels(tmp_path):
    """A PNG gives no pixel size: the 1 mm standing in for a pixel must not reach the model as mm."""
    from PIL import Image

    Image.fromarray(np.tile(np.arange(40, dtype=np.uint8), (30, 1)) * 5).save(tmp_path / "x.png")
    vol = load_volume(tmp_path / "x.png")
    whole = region_from_box(vol, ijk_min=(0, 0, 0), ijk_max=(39, 29, 0), name="box 1")
    assert whole.facts() == ('The second image is the whole scan again, not a close-up: the marked region "box 1" '
                             "is about 40 x 30 x 1 pixels (RL x AP x SI), near the midline of the scan.")
    part = region_from_box(vol, ijk_min=(2, 5, 0), ijk_max=(11, 14, 0), name="box 2", margin_mm=2)
    assert part.facts() == ('The second image is a close-up of the marked region "box 2": about 10 x 10 x 1 pixels '
                            "(RL x AP x SI), in the right side of the scan; the image shows 14 x 14 x 1 pixels of "
                            "the scan around it.")
    assert "10 x 10 x 1 pixels (RL x AP x SI)" in part.describe() and "(14 x 14 x 1 pixels)" in part.describe()
