"""Imaging layer: files/arrays -> display orientation -> the [3, 512, 512, D] model tensor."""

import json
import locale
import os
import re

import nibabel
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from RadFMSlicer.errors import ImageError
from RadFMSlicer.imaging import (
    LPS_TO_RAS,
    WINDOW_PRESETS,
    ModelImage,
    Window,
    choose_depth,
    load_volume,
    preprocess,
    volume_from_array,
)

NIB_DATA = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data")
CT_SMALL = get_testdata_file("CT_small.dcm")
MR_SMALL = get_testdata_file("MR_small.dcm")


def hounsfield(path):
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


# ----------------------------------------------------------------------------- real scans
def test_ct_small_gets_soft_tissue_window_and_exact_pixels():
    img = preprocess(load_volume(CT_SMALL))
    t = img.tensor
    assert t.shape == (3, 512, 512, 4) and t.dtype == torch.float32
    assert img.window["preset"] == "soft_tissue" and (img.window["low"], img.window["high"]) == (-160, 240)
    assert torch.equal(t[0], t[1]) and torch.equal(t[0], t[2])
    # identity direction: rows/cols as stored; nearest 128 -> 512 repeats each pixel 4 times
    expected = np.clip((hounsfield(CT_SMALL) + 160) / 400, 0, 1)
    for d in range(4):  # one slice repeated to D = 4
        np.testing.assert_allclose(t[0, ::4, ::4, d].numpy(), expected, atol=1e-6)
    assert t.min() == 0 and t.max() == 1


def test_mr_small_gets_percentile_window():
    vol = load_volume(MR_SMALL)
    img = preprocess(vol)
    assert vol.modality == "MR" and img.window["mode"] == "percentile"
    lo, hi = np.percentile(pydicom.dcmread(MR_SMALL).pixel_array, [0.5, 99.5])
    assert img.window["low"] == pytest.approx(lo) and img.window["high"] == pytest.approx(hi)
    assert img.tensor.shape == (3, 512, 512, 4)
    assert 0 <= float(img.tensor.min()) and float(img.tensor.max()) <= 1


@pytest.mark.parametrize("name", ["anatomical.nii", "standard.nii.gz"])
def test_nifti_matches_nibabel_canonical_orientation(name):
    """Independent check: nibabel's RAS+ canonical array, flipped to (S->I, A->P, R->L)."""
    img = nibabel.as_closest_canonical(nibabel.load(os.path.join(NIB_DATA, name)))
    canon = np.asarray(img.dataobj, dtype=np.float32)  # [x: ->R, y: ->A, z: ->S]
    vol = load_volume(os.path.join(NIB_DATA, name))
    np.testing.assert_array_equal(vol.voxels, canon.transpose(2, 1, 0)[::-1, ::-1, ::-1])
    far = (img.affine @ [*(np.array(canon.shape) - 1), 1])[:3]  # right-, anterior-, superior-most voxel
    np.testing.assert_allclose(vol.display_to_ras[:3, 3], far, atol=1e-4)
    model = preprocess(vol)
    assert model.tensor.shape == (3, 512, 512, choose_depth(canon.shape[2]))


def test_4d_nifti_is_refused_with_how_to_pick_a_volume():
    with pytest.raises(ImageError, match=r"4D.*extract the volume"):
        load_volume(os.path.join(NIB_DATA, "example4d.nii.gz"))


def test_4d_nifti_error_gives_the_shape_in_the_files_own_order(tmp_path):
    path = tmp_path / "4d.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((32, 32, 8, 3), np.float32), np.eye(4)), path)
    with pytest.raises(ImageError, match=r"4d.nii.gz is a 4D image of shape \(32, 32, 8, 3\);"):
        load_volume(path)


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".nii.gz"])
def test_round_trip_through_simpleitk_formats(tmp_path, ext):
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1000, size=(5, 6, 7)).astype(np.int16)  # [k, j, i]
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.5, 0.6, 3.0))
    sitk.WriteImage(image, str(tmp_path / f"v{ext}"))
    vol = load_volume(tmp_path / f"v{ext}")
    # LPS identity: i runs R->L and j A->P already; k runs I->S, so slices are reversed
    np.testing.assert_array_equal(vol.voxels, arr[::-1])
    assert vol.spacing_mm == pytest.approx((3.0, 0.6, 0.5))
    assert preprocess(vol, "lung").tensor.shape == (3, 512, 512, 4)


def test_png_is_2d_taken_as_drawn_and_repeated_to_4_slices(tmp_path):
    pixels = np.tile(np.arange(40, dtype=np.uint8), (30, 1)) * 5
    pixels[0, 0] = 255
    Image.fromarray(pixels).save(tmp_path / "x.png")
    vol = load_volume(tmp_path / "x.png")
    assert vol.is_2d and vol.shape == (1, 30, 40)
    np.testing.assert_array_equal(vol.voxels[0], pixels)
    t = preprocess(vol).tensor
    assert t.shape == (3, 512, 512, 4)
    assert all(torch.equal(t[..., 0], t[..., d]) for d in range(4))


def test_rgb_jpeg_is_converted_to_gray(tmp_path):
    rgb = np.zeros((20, 24, 3), np.uint8)
    rgb[:, 12:] = (200, 200, 200)
    Image.fromarray(rgb).save(tmp_path / "x.jpg")
    vol = load_volume(tmp_path / "x.jpg")
    assert vol.shape == (1, 20, 24) and any("gray" in n for n in vol.notes)
    assert vol.voxels[0, :, 20].mean() > 150 > vol.voxels[0, :, 3].mean()


# ----------------------------------------------------------------------------- DICOM folder
def write_series(folder, uid, description, n, z_step=2.5):
    """n single-slice DICOM files, file names in reverse of the table position.

    GDCM's writer switches the process to the C locale and leaves it there (reading does
    not): the locale is put back, or every later ``open()`` in this test process decodes ASCII."""
    os.makedirs(folder, exist_ok=True)
    kept = locale.setlocale(locale.LC_ALL)
    try:
        _write_series(folder, uid, description, n, z_step)
    finally:
        locale.setlocale(locale.LC_ALL, kept)


def _write_series(folder, uid, description, n, z_step):
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(n):
        img = sitk.GetImageFromArray(np.full((8, 8), 10 * z - 100, np.int16))
        img.SetSpacing((0.7, 0.7))
        tags = {"0008|0060": "CT", "0020|000d": "1.2.3", "0020|000e": uid, "0008|103e": description,
                "0020|0032": f"-5\\-5\\{z * z_step}", "0020|0037": "1\\0\\0\\0\\1\\0",
                "0020|0013": str(z + 1), "0008|0018": f"{uid}.{z + 1}"}
        for tag, value in tags.items():
            img.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"{uid[-1]}_{n - 1 - z:03d}.dcm"))
        writer.Execute(img)


@pytest.fixture
def dicom_folder(tmp_path):
    write_series(tmp_path / "s1", "1.2.826.0.1.3680043.2.1125.1", "axial A", 6)
    write_series(tmp_path / "s2", "1.2.826.0.1.3680043.2.1125.2", "scout B", 3)
    return tmp_path


def test_dicom_folder_picks_longest_series_superior_first(dicom_folder):
    vol = load_volume(dicom_folder)
    assert vol.shape == (6, 8, 8) and vol.modality == "CT"
    assert vol.voxels[:, 0, 0].tolist() == [-50, -60, -70, -80, -90, -100]  # z = 12.5 (superior) first
    assert vol.spacing_mm == pytest.approx((2.5, 0.7, 0.7))
    assert any("axial A" in n and "scout B" in n for n in vol.notes)
    assert preprocess(vol).tensor.shape == (3, 512, 512, 4)


@pytest.mark.parametrize("choice", ["scout B", "SCOUT b", "1.2.826.0.1.3680043.2.1125.2"])
def test_dicom_folder_series_chosen_by_description_or_uid(dicom_folder, choice):
    assert load_volume(dicom_folder, series=choice).shape == (3, 8, 8)


def test_dicom_folder_unknown_series_lists_the_available_ones(dicom_folder):
    with pytest.raises(ImageError, match=r"No DICOM series 'liver'.*axial A.*6 slices"):
        load_volume(dicom_folder, series="liver")


@pytest.fixture
def ct_and_mr_folder(tmp_path):
    """Two single-slice series without descriptions: only modality and size tell them apart."""
    for source in (CT_SMALL, MR_SMALL):
        (tmp_path / os.path.basename(source)).write_bytes(open(source, "rb").read())
    return tmp_path


def test_series_without_descriptions_are_named_by_modality_and_size(ct_and_mr_folder):
    (note,) = load_volume(ct_and_mr_folder).notes
    assert "CT series 1, 1 slice of 128x128 [" in note and "MR series 1, 1 slice of 64x64 [" in note, note
    assert "no description" not in note
    with pytest.raises(ImageError, match=r"available: CT series 1, 1 slice of 128x128 \[.*MR series 1"):
        load_volume(ct_and_mr_folder, series="liver")


# ----------------------------------------------------------------------------- orientation
# Direction matrices (columns = LPS direction of i, j, k) for several acquisitions.
DIRECTIONS = {
    "lps_identity": np.eye(3),
    "ras_like": np.diag([-1.0, -1.0, 1.0]),
    "k_flipped": np.diag([1.0, 1.0, -1.0]),
    "all_flipped": -np.eye(3),
    "sagittal": np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float),  # i: A->P, j: S->I, k: R->L
    "coronal": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float),  # i: R->L, j: S->I, k: A->P
    "permuted": np.array([[0, -1, 0], [0, 0, 1], [-1, 0, 0]], float),
}
SHAPE_KJI = (4, 5, 6)  # distinct sizes so a wrong permutation shows
SPACING_IJK = (0.5, 0.7, 3.0)


def affine(direction, spacing=SPACING_IJK, origin=(10.0, -20.0, 30.0)):
    m = np.eye(4)
    m[:3, :3] = direction * np.asarray(spacing)
    m[:3, 3] = origin
    return m  # ijk -> LPS


def marker_array(ijk_to_lps):
    """Zeros with 1 at the most anterior, patient-right, superior voxel (LPS: -x, -y, +z)."""
    arr = np.zeros(SHAPE_KJI, np.int16)
    corners = [(k, j, i) for k in (0, SHAPE_KJI[0] - 1) for j in (0, SHAPE_KJI[1] - 1) for i in (0, SHAPE_KJI[2] - 1)]
    score = lambda kji: np.array([-1, -1, 1]) @ (ijk_to_lps @ [kji[2], kji[1], kji[0], 1])[:3]
    corner = max(corners, key=score)
    arr[corner] = 1
    return arr, corner


def expected_display_shape(direction):
    """Slice/row/col sizes: the original axes closest to z, y, x."""
    return tuple(SHAPE_KJI[2 - int(np.argmax(np.abs(direction[w])))] for w in (2, 1, 0))


@pytest.mark.parametrize("name", DIRECTIONS)
def test_marker_lands_top_left_first_slice_from_file(tmp_path, name):
    m = affine(DIRECTIONS[name])
    arr, corner = marker_array(m)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(SPACING_IJK)
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(DIRECTIONS[name].ravel().tolist())
    sitk.WriteImage(image, str(tmp_path / "m.nrrd"))
    vol = load_volume(tmp_path / "m.nrrd")
    assert vol.shape == expected_display_shape(DIRECTIONS[name])
    assert vol.voxels[0, 0, 0] == 1 and vol.voxels.sum() == 1
    marker_ras = LPS_TO_RAS @ m @ [corner[2], corner[1], corner[0], 1]
    np.testing.assert_allclose(vol.display_to_ras[:, 3], marker_ras, atol=1e-9)
    assert vol.to_display(arr)[0, 0, 0] == 1  # a mask on the same grid follows the voxels


@pytest.mark.parametrize("name", DIRECTIONS)
def test_marker_lands_top_left_first_slice_from_slicer_array(name):
    m = affine(DIRECTIONS[name])
    arr, _ = marker_array(m)
    for vol in (volume_from_array(arr, LPS_TO_RAS @ m, name="node"), volume_from_array(arr, ijk_to_lps=m)):
        assert vol.voxels[0, 0, 0] == 1 and vol.voxels.sum() == 1
        # display axes follow R->L, A->P, S->I in RAS: col +x is toward patient left (-x RAS)
        d2r = vol.display_to_ras
        assert d2r[2, 0] < 0 and d2r[1, 1] < 0 and d2r[0, 2] < 0


def test_sagittal_acquisition_spacing_follows_display_axes():
    m = affine(DIRECTIONS["sagittal"])
    vol = volume_from_array(marker_array(m)[0], ijk_to_lps=m)
    assert vol.spacing_mm == pytest.approx((0.7, 0.5, 3.0))  # slices = j (S->I), rows = i (A->P), cols = k


def test_single_sagittal_slice_keeps_its_plane_superior_up_anterior_left():
    arr = np.zeros((1, 5, 6), np.int16)
    arr[0, 0, 0] = 1  # j runs S->I and i runs A->P in the sagittal matrix
    vol = volume_from_array(arr, ijk_to_lps=affine(DIRECTIONS["sagittal"]))
    assert vol.is_2d and vol.shape == (1, 5, 6) and vol.voxels[0, 0, 0] == 1


def test_oblique_scan_is_shown_in_nearest_axial_orientation_with_exact_geometry():
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    m = affine(np.array([[1, 0, 0], [0, c, -s], [0, s, c]]))  # tilted 20 degrees about right-left
    arr = np.zeros(SHAPE_KJI, np.int16)
    arr[-1, 0, 0] = 1  # top slice, first row and column
    vol = volume_from_array(arr, ijk_to_lps=m)
    assert vol.voxels[0, 0, 0] == 1
    assert any("oblique" in n and "20.0 deg" in n for n in vol.notes)
    np.testing.assert_allclose(vol.display_to_ras[:, 3], LPS_TO_RAS @ m @ [0, 0, SHAPE_KJI[0] - 1, 1])


def test_array_without_geometry_is_taken_in_display_order():
    arr = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    vol = volume_from_array(arr)
    np.testing.assert_array_equal(vol.voxels, arr)
    assert vol.spacing_mm == (1.0, 1.0, 1.0) and vol.notes


# ----------------------------------------------------------------------------- windows / resampling
def ct_like(shape=(10, 16, 16)):
    rng = np.random.default_rng(1)
    arr = rng.uniform(-50, 80, size=shape).astype(np.float32)
    arr[:, :4] = -1000  # air
    arr[:, -2:] = 1200  # bone
    return arr


def test_auto_window_recognises_hounsfield_values_without_modality():
    img = preprocess(volume_from_array(ct_like()))
    assert img.window["preset"] == "soft_tissue" and img.window["auto"] == "CT-like values"
    mr = volume_from_array(np.abs(ct_like()) + 5)
    assert preprocess(mr).window["mode"] == "percentile"


def test_named_window_and_percentile_on_request():
    vol = volume_from_array(ct_like())
    lung = preprocess(vol, "lung")
    assert (lung.window["low"], lung.window["high"]) == (-1350, 150)
    assert float(lung.tensor[0, 0, 0, 0]) == pytest.approx((-1000 + 1350) / 1500)
    assert preprocess(vol, "percentile").window["mode"] == "percentile"
    assert preprocess(vol, Window(0, 100)).window["low"] == -50
    assert preprocess(vol, "40,400").window == preprocess(vol, "soft_tissue").window | {"preset": None}
    assert set(WINDOW_PRESETS) >= {"soft_tissue", "lung", "bone", "brain"}


@pytest.mark.parametrize("slices, depth", [(1, 4), (5, 4), (6, 4), (7, 8), (25, 24), (63, 64), (300, 64)])
def test_depth_is_closest_multiple_of_4_within_4_to_64(slices, depth):
    assert choose_depth(slices) == depth


def test_depth_override_and_linear_interpolation():
    vol = volume_from_array(ct_like((10, 16, 16)))
    near = preprocess(vol, depth=8)
    lin = preprocess(vol, depth=8, interpolation="linear")
    assert near.tensor.shape == lin.tensor.shape == (3, 512, 512, 8)
    assert lin.resample == {"size": [512, 512, 8], "interpolation": "linear"}
    assert not torch.equal(near.tensor, lin.tensor)
    assert 0 <= float(lin.tensor.min()) and float(lin.tensor.max()) <= 1


def test_provenance_is_json_and_describes_the_input():
    img = preprocess(load_volume(CT_SMALL))
    assert isinstance(img, ModelImage)
    d = json.loads(json.dumps(img.to_dict()))
    assert d["tensor_shape"] == [3, 512, 512, 4] and d["original_shape"] == [1, 128, 128]
    assert d["window"]["preset"] == "soft_tissue" and d["crop_box"] is None
    assert "CT_small.dcm" in img.describe() and "C40/W400" in img.describe()


def test_nan_and_inf_voxels_are_set_to_the_lowest_finite_value():
    arr = ct_like()
    arr[0, 5, 5], arr[1, 5, 5], arr[2, 5, 5] = np.nan, np.inf, -np.inf
    vol = volume_from_array(arr)
    assert np.isfinite(vol.voxels).all() and vol.voxels[0, 5, 5] == -1000
    assert any("3 NaN/inf voxels set to the lowest finite value (-1000)" in n for n in vol.notes)
    assert vol.notes[-1] in preprocess(vol).notes


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.nii.gz", "not found"),
    (lambda p: (p / "notes.nii").write_text("hello") and p / "notes.nii", "Cannot read.*supported"),
    (lambda p: p, "No DICOM series found"),
])
def test_bad_files(tmp_path, make, message):
    with pytest.raises(ImageError, match=message):
        load_volume(make(tmp_path))


def test_absurd_size_in_a_file_header_is_refused_before_reading(tmp_path):
    (tmp_path / "huge.raw").write_bytes(b"")  # the header alone claims 3000 slices
    (tmp_path / "huge.nhdr").write_text(
        "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 8 8 3000\nencoding: raw\ndata file: huge.raw\n")
    with pytest.raises(ImageError, match="3000 slices; the limit is 2048"):
        load_volume(tmp_path / "huge.nhdr")


def test_series_option_on_a_single_file_is_refused():
    with pytest.raises(ImageError, match="only applies to a DICOM folder"):
        load_volume(CT_SMALL, series="abc")


@pytest.mark.parametrize("array, message", [
    (np.zeros((0, 4, 4)), "empty"),
    (np.full((3, 4, 4), 7.0), r"same value \(7\)"),
    (np.full((3, 4, 4), np.nan), "only NaN"),
    (np.zeros((2, 3, 4, 2)), r"4D.*extract the volume"),
    (np.zeros((2049, 2, 2), np.uint8), "2049 slices; the limit is 2048"),
    (np.zeros((1, 2, 4097), np.uint8), "the limit is 4096"),
    (np.broadcast_to(np.zeros(1, np.uint8), (2000, 2000, 1000)), "the limit is 2,000,000,000"),
    (np.array([[["a", "b"]]]), "only real-valued"),
])
def test_bad_arrays(array, message):
    with pytest.raises(ImageError, match=message):
        volume_from_array(array)


def test_single_size_4th_axis_is_accepted():
    assert volume_from_array(ct_like()[..., None]).shape == (10, 16, 16)


@pytest.mark.parametrize("matrix", [np.eye(3), np.zeros((4, 4)), np.full((4, 4), np.nan)])
def test_bad_geometry_matrix(matrix):
    with pytest.raises(ImageError, match="4x4"):
        volume_from_array(ct_like(), matrix)


@pytest.mark.parametrize("kwargs, message", [
    ({"window": "liver"}, "Unknown window 'liver'.*soft_tissue, lung, bone, brain"),
    ({"window": "40,0"}, "width must be a number > 0"),
    ({"window": {"low": 5, "high": 5}}, "high > low"),
    ({"depth": 6}, "multiple of 4 from 4 to 64"),
    ({"depth": 68}, "multiple of 4 from 4 to 64"),
    ({"depth": 0}, "multiple of 4 from 4 to 64"),
    ({"depth": 8.0}, "multiple of 4 from 4 to 64"),
    ({"interpolation": "cubic"}, "Unknown interpolation"),
])
def test_bad_preprocess_options(kwargs, message):
    with pytest.raises(ImageError, match=message):
        preprocess(volume_from_array(ct_like()), **kwargs)


def test_window_width_must_be_positive():
    with pytest.raises(ImageError, match="width must be a number > 0"):
        Window(40, -10)


@pytest.mark.parametrize("window, message", [
    ("nan,400", r"Window centre must be a finite number \(got centre nan, width 400\)"),
    ("-inf,400", r"Window centre must be a finite number \(got centre -inf, width 400\)"),
    ("40,nan", r"Window width must be a number > 0 \(got centre 40, width nan\)"),
    ("1e30,1", r"Window 1e\+30,1 cannot be applied: .* low, high and width come out as 1e\+30, 1e\+30, 0;"),
    ("40,1e-300", r"come out as 40, 40, 0;"),
    ("1e308,1e308", r"come out as inf, inf, nan;"),
    ("0,6e38", r"come out as -3e\+38, 3e\+38, inf;"),
])
def test_a_bad_window_names_the_bad_number_and_the_spelling_front_ends_take(window, message):
    with pytest.raises(ImageError, match=message) as caught:
        preprocess(volume_from_array(ct_like()), window)
    assert str(caught.value).endswith('give "centre,width" such as "40,400" (soft tissue).')


def test_a_very_narrow_window_is_applied_without_numpy_warnings(recwarn):
    x = preprocess(volume_from_array(ct_like()), "0,1e-38").tensor
    assert not recwarn.list, [str(w.message) for w in recwarn.list]
    assert set(torch.unique(x).tolist()) <= {0.0, 1.0} and not x.isnan().any()


# ----------------------------------------------------------------------------- files that lie
def _scan_file(tmp_path, ext, data=None, compress=False):
    data = np.linspace(-500, 500, 20 * 30 * 40, dtype=np.float32).reshape(20, 30, 40) if data is None else data
    path = tmp_path / f"scan{ext}"
    if ext.startswith(".nii"):
        nibabel.save(nibabel.Nifti1Image(np.transpose(data, (2, 1, 0)), np.eye(4)), path)
    else:
        sitk.WriteImage(sitk.GetImageFromArray(data), str(path), compress)
    return path


def _cut(path, keep=0.6):
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    return path


@pytest.mark.parametrize("ext, compress", [(".nii", False), (".nii.gz", False), (".mha", False), (".mha", True),
                                           (".nrrd", False), (".nrrd", True)])
def test_a_truncated_file_is_refused_as_truncated(tmp_path, ext, compress):
    path = _cut(_scan_file(tmp_path, ext, compress=compress))
    with pytest.raises(ImageError, match=f"{path.name} is truncated"):
        load_volume(path)


def test_a_nifti_header_declaring_more_voxels_than_the_file_holds_is_truncated(tmp_path):
    path = _scan_file(tmp_path, ".nii", data=(np.arange(6000, dtype=np.int16) % 97).reshape(10, 20, 30))
    raw = bytearray(path.read_bytes())
    raw[42:44] = np.int16(40).tobytes()  # dim[1]: 30 -> 40 columns, data left as is
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match=r"is truncated: its header declares 16,000 bytes .* holds 12,000"):
        load_volume(path)


def test_a_truncated_jpeg_is_refused_and_prints_nothing(tmp_path, capfd):
    Image.fromarray((np.indices((64, 64)).sum(0) % 251).astype(np.uint8)).save(tmp_path / "x.jpg")
    path = _cut(tmp_path / "x.jpg", 0.5)
    with pytest.raises(ImageError, match="x.jpg is truncated"):
        load_volume(path)
    assert capfd.readouterr() == ("", "")  # libjpeg's own warning went to stdout before


def test_a_truncated_label_map_is_refused(tmp_path):
    from RadFMSlicer.regions import load_mask

    volume = load_volume(_scan_file(tmp_path, ".nii.gz"))
    mask = _cut(_scan_file(tmp_path, ".mha", data=np.ones((20, 30, 40), np.uint8)), 0.5)
    with pytest.raises(ImageError, match="truncated"):
        load_mask(mask, volume)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".mha", ".nrrd"])
def test_nan_voxels_are_reported_in_every_format(tmp_path, ext):
    data = np.linspace(-500, 500, 20 * 30 * 40, dtype=np.float32).reshape(20, 30, 40)
    data[:10] = np.nan
    vol = load_volume(_scan_file(tmp_path, ext, data=data))
    assert any("12000 NaN/inf voxels set to the lowest finite value" in n for n in vol.notes), vol.notes
    assert vol.voxels.min() > -500.1 and np.isfinite(vol.voxels).all()


@pytest.mark.parametrize("ext", [".nii.gz", ".mha"])
def test_an_all_nan_scan_is_refused_as_nan_not_as_constant(tmp_path, ext):
    path = _scan_file(tmp_path, ext, data=np.full((4, 5, 6), np.nan, np.float32))
    with pytest.raises(ImageError, match="only NaN/inf values"):
        load_volume(path)


def _dicom_series(folder, orientations, positions):
    from pydicom.uid import generate_uid

    folder.mkdir()
    series = generate_uid()
    for k, (orientation, position) in enumerate(zip(orientations, positions)):
        ds = pydicom.dcmread(MR_SMALL)
        ds.ImageOrientationPatient, ds.ImagePositionPatient = list(orientation), list(position)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series, generate_uid(), k + 1
        ds.save_as(folder / f"{k}.dcm")
    return folder


def test_unevenly_spaced_series_is_noted_not_warned_on_stderr(tmp_path, capfd):
    z = [0, 2, 4, 6, 12, 14, 16]  # a missing stretch of slices
    folder = _dicom_series(tmp_path / "gap", [(1, 0, 0, 0, 1, 0)] * 7, [(0, 0, v) for v in z])
    vol = load_volume(folder)
    assert any("slices unevenly spaced" in n for n in vol.notes), vol.notes
    assert "WARNING" not in capfd.readouterr().err


def test_a_radial_series_is_not_stacked_as_a_volume(tmp_path):
    angles = [np.pi * k / 7 for k in range(7)]
    folder = _dicom_series(tmp_path / "radial", [(np.cos(a), np.sin(a), 0, 0, 0, -1) for a in angles],
                           [(-32 * np.cos(a), -32 * np.sin(a), 32) for a in angles])
    with pytest.raises(ImageError, match="mixes slice orientations"):
        load_volume(folder)


def test_a_truncated_integer_nifti_gz_is_refused_though_its_values_need_no_nan_check(tmp_path):
    path = _cut(_scan_file(tmp_path, ".nii.gz", data=(np.arange(24000, dtype=np.int16) % 300).reshape(20, 30, 40)))
    with pytest.raises(ImageError, match="is truncated"):
        load_volume(path)


# ----------------------------------------------------------------------------- NIfTI geometry
def _anatomical(tmp_path, qform, sform, qcode, scode):
    img = nibabel.load(os.path.join(NIB_DATA, "anatomical.nii"))
    out = nibabel.Nifti1Image(np.asanyarray(img.dataobj), None, img.header.copy())
    out.set_qform(qform, code=qcode)
    out.set_sform(sform, code=scode)
    path = str(tmp_path / "qs.nii")
    nibabel.save(out, path)
    return path


def _turned(affine, degrees, shift_mm):
    a = np.radians(degrees)
    turned = affine.copy()
    turned[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ affine[:3, :3]
    turned[:3, 3] += shift_mm
    return turned


@pytest.mark.parametrize("scode, turn, used, apart", [
    (1, 0, "sform", r"by up to 5 mm at the volume's corners, 0 deg apart"),  # scanner sform: ITK takes it
    (2, 10, "qform", r"by up to \d+\.?\d* mm at the volume's corners, 10 deg apart"),
])
def test_a_nifti_whose_qform_and_sform_disagree_says_which_is_used_and_by_how_much(tmp_path, scode, turn, used,
                                                                                    apart):
    affine = nibabel.load(os.path.join(NIB_DATA, "anatomical.nii")).affine
    path = _anatomical(tmp_path, affine, _turned(affine, turn, [5.0, 0, 0]), 1, scode)
    vol = load_volume(path)
    other = {"sform": "qform", "qform": "sform"}[used]
    assert any(re.fullmatch(rf"the NIfTI qform and sform disagree \({apart}\): the {used} is used \(as ITK and "
                            rf"3D Slicer read the file\), the {other} ignored", n) for n in vol.notes), vol.notes
    origin = vol.ijk_to_ras[:3, 3]
    expected = _turned(affine, turn, [5.0, 0, 0]) if used == "sform" else affine
    assert origin == pytest.approx(expected[:3, 3], abs=1e-3)


def test_a_nifti_whose_qform_and_sform_agree_has_no_note():
    assert load_volume(os.path.join(NIB_DATA, "anatomical.nii")).notes == []


@pytest.mark.parametrize("pixdim, shown", [((2, 0, 2), "2 x 0 x 2"), ((2, 2, np.nan), "2 x 2 x nan")])
def test_a_nifti_without_a_voxel_size_is_refused(tmp_path, pixdim, shown):
    path = str(tmp_path / "no_size.nii")
    nibabel.save(nibabel.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(6, 5, 4), np.eye(4)), path)
    raw = bytearray(open(path, "rb").read())
    raw[80:92] = np.asarray(pixdim, "<f4").tobytes()  # pixdim[1..3]: what nibabel would mend on load
    open(path, "wb").write(raw)
    with pytest.raises(ImageError, match=rf"no_size.nii: its header gives no voxel size \(pixdim {shown}\): no "
                                         r"size in mm can be given"):
        load_volume(path)


def test_a_nifti_scl_slope_taking_values_far_beyond_any_scanner_is_noted(tmp_path):
    path = str(tmp_path / "scaled.nii")
    image = nibabel.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(6, 5, 4), np.eye(4))
    image.header.set_slope_inter(1e30, 0)
    nibabel.save(image, path)
    vol = load_volume(path)
    assert "values run from 0 to 1.19e+32 after the header's scl_slope 1e+30 and scl_inter 0: far beyond any " \
           "scanner's units (CT: about -1024 to 3000 HU); the rescale in the header is likely wrong, and the image " \
           "may show all white or black" in vol.notes, vol.notes
    image.header.set_slope_inter(2, -100)  # an ordinary rescale: nothing to say
    nibabel.save(image, path)
    assert load_volume(path).notes == []


def test_the_numpy_resize_picks_the_voxels_torch_interpolate_picks():
    """The CPU nearest path resizes without torch (a preview never imports it); the model must get the
    same tensor as interpolate made: every slice count a scan has, to every depth and to 512 pixels."""
    from RadFMSlicer.imaging.model_input import MAX_DEPTH, MODEL_SIZE, nearest_indices

    for n_in in [*range(1, 1100), 2048, 4097]:
        for n_out in (*range(4, MAX_DEPTH + 1, 4), MODEL_SIZE):
            positions = torch.arange(n_in, dtype=torch.float32)[None, None]
            picked = torch.nn.functional.interpolate(positions, size=n_out, mode="nearest")[0, 0].long().numpy()
            np.testing.assert_array_equal(nearest_indices(n_in, n_out), picked, err_msg=f"{n_in} -> {n_out}")


@pytest.mark.parametrize("shape", [(7, 384, 300), (70, 600, 512), (3, 256, 1024)])
def test_preprocess_on_the_cpu_equals_windowing_then_interpolate(shape):
    volume = volume_from_array(np.random.default_rng(1).integers(-1000, 2000, shape, dtype=np.int16))
    image = preprocess(volume, "40,400")
    low, high = image.window["low"], image.window["high"]
    windowed = ((torch.from_numpy(np.ascontiguousarray(volume.voxels)).float() - low) / (high - low)).clamp(0, 1)
    expected = torch.nn.functional.interpolate(windowed[None, None], size=(image.shape[-1], 512, 512))[0, 0]
    expected = expected.permute(1, 2, 0)  # [rows, cols, slices]
    assert isinstance(image.pixels, np.ndarray) and image.shape == (3, 512, 512, choose_depth(shape[0]))
    assert torch.equal(image.tensor[1], expected)
