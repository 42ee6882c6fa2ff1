"""DICOM files the model must not see as they are: refused before any pixels are read, or noted.

Every bad file is made here from pydicom's real CT_small.dcm / MR_small.dcm (and their
compressed copies), with one thing in the header or the pixel data changed.
"""

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from RadFMSlicer.errors import ImageError
from RadFMSlicer.imaging import load_volume, preprocess
from RadFMSlicer.regions import region_from_box

CT_SMALL = get_testdata_file("CT_small.dcm")
MR_SMALL = get_testdata_file("MR_small.dcm")


def edited(tmp_path, edit, source=CT_SMALL, name="edited.dcm"):
    ds = pydicom.dcmread(source)
    edit(ds)
    path = tmp_path / name
    ds.save_as(path)
    return str(path)


def set_rows(n):
    def edit(ds):
        ds.Rows = n
    return edit


def cut_pixels(ds):
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def set_frames(ds):
    ds.NumberOfFrames = 2


# ----------------------------------------------------------------------------- pixel data vs header
@pytest.mark.parametrize("edit, header, holds", [
    (set_rows(1000), r"1000x128 pixels of 16 bits \(256,000 bytes\)", "32,768 bytes, i.e. 128 rows of 128"),
    (set_rows(64), r"64x128 pixels of 16 bits \(16,384 bytes\)", "32,768 bytes, i.e. 128 rows of 128"),
    (cut_pixels, r"128x128 pixels of 16 bits \(32,768 bytes\)", "16,384 bytes, i.e. 64 rows of 128"),
    (set_frames, r"128x128 pixels, 2 frames of 16 bits \(65,536 bytes\)", "32,768 bytes"),
])
def test_pixel_data_that_does_not_fit_the_header_is_refused_naming_both(tmp_path, edit, header, holds):
    path = edited(tmp_path, edit)
    with pytest.raises(ImageError, match=rf"{path}: its pixel data does not fit its header: the header says "
                                         rf"{header} but the pixel data holds {holds}"):
        load_volume(path)


def test_an_odd_length_padded_with_one_byte_and_trailing_zero_padding_are_accepted(tmp_path):
    def odd(ds):  # 8-bit pixels, 127 x 127 = an odd byte count, padded to even by one byte
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.Rows = ds.Columns = 127
        ds.PixelData = (np.arange(127 * 127) % 200).astype(np.uint8).tobytes() + b"\0"

    assert load_volume(edited(tmp_path, odd)).shape == (1, 127, 127)
    vol = load_volume(get_testdata_file("MR_small_padded.dcm"))
    assert vol.shape == (1, 64, 64) and "128 bytes of zero padding after the pixels ignored" in vol.notes


@pytest.mark.parametrize("source", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_compressed_pixel_data_must_hold_the_frames_the_header_says(tmp_path, source):
    assert load_volume(get_testdata_file(source)).shape == (1, 64, 64)
    path = edited(tmp_path, set_frames, get_testdata_file(source))
    with pytest.raises(ImageError, match=r"header says 64x64 pixels, 2 frames of 16 bits but its compressed "
                                         r"pixel data holds 1 frame;"):
        load_volume(path)


@pytest.mark.parametrize("source", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
@pytest.mark.parametrize("rows", [32, 128])
def test_a_compressed_frame_of_another_size_than_the_header_is_refused(tmp_path, source, rows):
    path = edited(tmp_path, set_rows(rows), get_testdata_file(source))
    with pytest.raises(ImageError, match=rf"header says {rows}x64 pixels of 16 bits but its compressed frame 1 "
                                         r"is 64x64 pixels"):
        load_volume(path)


@pytest.mark.parametrize("rows", [32, 128])
def test_an_rle_frame_that_decodes_to_another_size_than_the_header_is_refused(tmp_path, rows):
    path = edited(tmp_path, set_rows(rows), get_testdata_file("MR_small_RLE.dcm"))
    with pytest.raises(ImageError, match=rf"header says {rows}x64 pixels of 16 bits \({rows * 64:,} pixels a frame\) "
                                         r"but its compressed frame 1 holds 4,097 pixels, i.e. 64.02 rows of 64"):
        load_volume(path)


# ----------------------------------------------------------------------------- a series
def series(folder, n=3, edit=None, source=CT_SMALL, z_step=5.0):
    """n slices of one series (one SeriesInstanceUID) at z = 0, 5, 10 ...; edit(ds, k) changes slice k."""
    folder.mkdir(exist_ok=True)
    uid = generate_uid()
    for k in range(n):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = uid, generate_uid(), k + 1
        ds.ImagePositionPatient = [-50.0, -50.0, k * z_step]
        if edit:
            edit(ds, k)
        ds.save_as(folder / f"slice{k}.dcm")
    return folder


def test_a_good_series_is_read_as_one_volume(tmp_path):
    vol = load_volume(series(tmp_path / "s", 4))
    assert vol.shape == (4, 128, 128) and vol.notes == []


@pytest.mark.parametrize("key, what", [("PatientID", "patients"), ("StudyInstanceUID", "studies"),
                                       ("FrameOfReferenceUID", "frames of reference")])
def test_one_series_holding_two_patients_studies_or_frames_is_never_stacked(tmp_path, key, what):
    def second_one(ds, k):
        if k >= 3:
            setattr(ds, key, "1.2.3.999" if key.endswith("UID") else "OTHER-PATIENT")

    folder = series(tmp_path / "mixed", 5, second_one)
    first = str(pydicom.dcmread(CT_SMALL).get(key))
    other = "1.2.3.999" if key.endswith("UID") else "OTHER-PATIENT"
    with pytest.raises(ImageError, match=rf"mixes {what}: {key} '{first}' \(3 slices\), {key} '{other}' "
                                         r"\(2 slices\); slices of different .* are never stacked"):
        load_volume(folder)


def test_different_images_at_one_position_are_refused_naming_the_position_and_files(tmp_path):
    def same_place(ds, k):
        ds.ImagePositionPatient = [-50.0, -50.0, 0.0 if k < 2 else 5.0 * k]

    with pytest.raises(ImageError, match=r"has 2 different images at the same position \(-50, -50, 0\) mm: "
                                         r"slice\d.dcm, slice\d.dcm \(two echoes"):
        load_volume(series(tmp_path / "dup", 4, same_place))


def test_byte_identical_copies_of_a_slice_are_used_once_and_said(tmp_path):
    folder = series(tmp_path / "copies", 3)
    for copy in ("copy_a.dcm", "copy_b.dcm"):
        shutil.copy(folder / "slice0.dcm", folder / copy)
    vol = load_volume(folder)
    assert vol.shape == (3, 128, 128)
    assert any(n.startswith("2 files ignored as byte-identical copies of another slice at the same position")
               for n in vol.notes), vol.notes


def test_a_series_of_two_slice_sizes_says_so_and_how_to_pick(tmp_path):
    def small(ds, k):
        if k == 2:
            mr = pydicom.dcmread(MR_SMALL)
            ds.Rows, ds.Columns, ds.PixelData = mr.Rows, mr.Columns, mr.PixelData

    with pytest.raises(ImageError, match=r"holds slices of 2 sizes: 128x128 \(2 slices\), 64x64 \(1 slice\) "
                                         r"\(e.g. 128x128: slice\d.dcm, 64x64: slice2.dcm\).*put the slices of one "
                                         r"size in their own folder"):
        load_volume(series(tmp_path / "sizes", 3, small))


def test_one_bad_slice_in_a_series_is_named(tmp_path):
    def cut_one(ds, k):
        if k == 1:
            cut_pixels(ds)

    with pytest.raises(ImageError, match=r"slice1.dcm: its pixel data does not fit its header"):
        load_volume(series(tmp_path / "cut", 3, cut_one))


def test_a_multi_frame_file_mixed_with_single_slices_is_refused(tmp_path):
    def two_frames(ds, k):
        if k == 0:
            ds.NumberOfFrames = 2
            ds.PixelData = ds.PixelData * 2

    with pytest.raises(ImageError, match=r"mixes multi-frame files \(slice0.dcm: 2 frames\) with other files"):
        load_volume(series(tmp_path / "frames", 3, two_frames))


# ----------------------------------------------------------------------------- usable but odd, or no size
def test_an_absurd_rescale_slope_is_noted_and_one_beyond_single_precision_refused(tmp_path):
    def slope(value):
        def edit(ds):
            ds.RescaleSlope = value
        return edit

    vol = load_volume(edited(tmp_path, slope(1e30)))
    assert any(n.startswith("values run from 1.28e+32 to 2.19e+33 after the header's RescaleSlope 1e+30 and "
                            "RescaleIntercept -1024: far beyond any scanner's units") for n in vol.notes), vol.notes
    with pytest.raises(ImageError, match=r"has values up to 2.19e\+39, beyond single precision"):
        load_volume(edited(tmp_path, slope(1e36)))


@pytest.mark.parametrize("spacing", [[0, 0], ["nan", "nan"], [-0.5, 0.5]])
def test_a_pixel_spacing_that_is_no_size_is_refused(tmp_path, spacing):
    def edit(ds):
        ds.PixelSpacing = spacing

    with pytest.raises(ImageError, match=r"its PixelSpacing .* is not a pixel size \(two positive numbers of mm\)"):
        load_volume(edited(tmp_path, edit))


def test_a_missing_pixel_spacing_is_noted(tmp_path):
    def edit(ds):
        del ds.PixelSpacing

    vol = load_volume(edited(tmp_path, edit))
    assert "edited.dcm gives no pixel size (no PixelSpacing): sizes are told in pixels, not mm" in vol.notes
    assert not vol.size_known
    region = region_from_box(vol, ijk_min=(10, 20, 0), ijk_max=(29, 49, 0), name="box 1", margin_mm=0)
    assert 'marked region "box 1": about 20 x 30 x 1 pixels (RL x AP x SI)' in region.facts(), region.facts()


def test_a_monochrome1_ct_is_noted_as_inverted_and_not_given_a_hounsfield_window(tmp_path):
    def edit(ds):
        ds.PhotometricInterpretation = "MONOCHROME1"

    vol = load_volume(edited(tmp_path, edit))
    assert any("MONOCHROME1" in n and "no longer Hounsfield units; windowed by percentile" in n
               for n in vol.notes), vol.notes
    image = preprocess(vol)  # the soft-tissue window showed the inverted values (all below -1000) as black
    assert image.window["mode"] == "percentile" and image.window["auto"] == "not Hounsfield units"
    assert float(image.tensor.std()) > 0.1


def test_a_series_mixing_monochrome1_and_monochrome2_is_refused(tmp_path):
    def inverted(ds, k):
        if k == 2:
            ds.PhotometricInterpretation = "MONOCHROME1"

    with pytest.raises(ImageError, match=r"mixes photometric interpretations: PhotometricInterpretation "
                                         r"'MONOCHROME2' \(2 slices\), PhotometricInterpretation 'MONOCHROME1'"):
        load_volume(series(tmp_path / "photometric", 3, inverted))


@pytest.mark.parametrize("key, value, what", [("Modality", "MR", "modalities")])
def test_one_series_holding_two_modalities_is_never_stacked(tmp_path, key, value, what):
    def other(ds, k):
        if k == 1:
            setattr(ds, key, value)

    with pytest.raises(ImageError, match=rf"mixes {what}: {key} 'CT' \(2 slices\), {key} '{value}' \(1 slice\)"):
        load_volume(series(tmp_path / "mixed", 3, other))


def test_a_series_mixing_pixel_sizes_is_refused(tmp_path):
    def bigger(ds, k):
        if k == 1:
            ds.PixelSpacing = [1.0, 1.0]

    with pytest.raises(ImageError, match=r"mixes pixel sizes: PixelSpacing 0.661468\\0.661468 \(2 slices\), "
                                         r"PixelSpacing 1.0\\1.0 \(1 slice\)"):
        load_volume(series(tmp_path / "sizes", 3, bigger))


def test_slices_without_a_position_are_noted(tmp_path):
    def unplaced(ds, k):
        del ds.ImagePositionPatient

    vol = load_volume(series(tmp_path / "unplaced", 3, unplaced))
    assert vol.shape == (3, 128, 128)
    assert any(n.startswith("3 of 3 slices give no position (ImagePositionPatient)") for n in vol.notes), vol.notes


def test_a_frame_count_that_is_no_number_is_refused_naming_it():
    with pytest.raises(ImageError, match=r"badVR.dcm: its NumberOfFrames '1A' is not a positive whole number"):
        load_volume(get_testdata_file("badVR.dcm"))


def test_a_colour_ct_image_is_noted_as_no_hounsfield_units(tmp_path):
    def rgb(ds):
        gray = (ds.pixel_array.astype(np.int32) * 255 // max(int(ds.pixel_array.max()), 1)).astype(np.uint8)
        ds.PixelData = np.repeat(gray[..., None], 3, axis=2).tobytes()
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        del ds.RescaleSlope, ds.RescaleIntercept

    vol = load_volume(edited(tmp_path, rgb))
    assert any(n.startswith("a colour (RGB) CT image: a screen capture or rendering, not Hounsfield units")
               for n in vol.notes), vol.notes


@pytest.mark.parametrize("spacing", ["1 0 1", "1 nan 1"])
def test_a_metaimage_whose_voxel_size_is_zero_is_refused_as_no_size_not_as_truncated(tmp_path, spacing):
    import SimpleITK as sitk

    path = tmp_path / "scan.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(120, dtype=np.int16).reshape(4, 5, 6)), str(path))
    path.write_bytes(path.read_bytes().replace(b"ElementSpacing = 1 1 1", f"ElementSpacing = {spacing}".encode()))
    with pytest.raises(ImageError, match=r"scan.mha: its voxel size \(1 x 0 x [01] mm\) is not a size: no size in "
                                         r"mm can be given"):
        load_volume(path)


@pytest.mark.parametrize("orientation", [[1, 0, 0, 1, 0, 0], [0] * 6, [1, 0, 0, 0.5, 0.5, 0], [1, 0, 0, 0, 1]])
def test_an_orientation_that_is_no_orientation_is_refused_not_taken_as_axial(tmp_path, orientation):
    def edit(ds):
        ds.ImageOrientationPatient = orientation

    with pytest.raises(ImageError, match=r"edited.dcm: its ImageOrientationPatient .* is not two perpendicular unit "
                                         r"vectors: the plane and the patient's sides cannot be known"):
        load_volume(edited(tmp_path, edit))


def test_a_missing_orientation_on_a_ct_is_noted(tmp_path):
    def edit(ds):
        del ds.ImageOrientationPatient

    vol = load_volume(edited(tmp_path, edit))
    assert "edited.dcm gives no orientation (no ImageOrientationPatient): taken as axial, so the plane and the " \
           "patient's sides may be wrong" in vol.notes


@pytest.mark.parametrize("ext, written, parallel", [
    (".mha", b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 1 0 0 1 0 0 0 0 1"),
    (".nrrd", b"space directions: (1,0,0) (0,1,0) (0,0,1)", b"space directions: (1,0,0) (1,0,0) (0,0,1)"),
])
def test_a_direction_matrix_with_parallel_axes_is_refused_naming_it(tmp_path, ext, written, parallel):
    import SimpleITK as sitk

    path = tmp_path / f"scan{ext}"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(120, dtype=np.int16).reshape(4, 5, 6)), str(path))
    path.write_bytes(path.read_bytes().replace(written, parallel))
    with pytest.raises(ImageError, match=rf"scan{ext}: its direction matrix \(1.0, 1.0, 0.0, .*\) has parallel or "
                                         r"zero axes: its orientation cannot be known"):
        load_volume(path)


@pytest.mark.parametrize("key, value", [("RescaleSlope", 0), ("RescaleSlope", "nan"), ("RescaleSlope", "inf"),
                                        ("RescaleIntercept", "nan")])
def test_a_rescale_that_is_no_number_is_refused_not_dropped(tmp_path, key, value):
    """GDCM dropped these: a NaN intercept gave CT_small's raw values (128..2191) as if they were HU."""
    def edit(ds):
        setattr(ds, key, value)

    with pytest.raises(ImageError, match=rf"edited.dcm: its {key} '(0.0|nan|inf)' is not a usable number: the reader "
                                         r"would drop it, and the values \(Hounsfield units on a CT\) would be wrong"):
        load_volume(edited(tmp_path, edit))


def test_a_series_mixing_8_and_16_bit_slices_is_refused(tmp_path):
    """The 8-bit slice came back without its RescaleIntercept (128..1016 instead of -896..1167 HU)."""
    def eight_bits(ds, k):
        if k == 1:
            hu = ds.pixel_array.astype(np.int32) - 1024
            ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 0, 8, 8, 7
            ds.PixelData = (np.clip(hu + 1024, 0, 2047) // 8).astype(np.uint8).tobytes()
            ds.RescaleSlope, ds.RescaleIntercept = 8, -1024

    with pytest.raises(ImageError, match=r"mixes pixel depths: BitsAllocated '16' \(2 slices\), BitsAllocated '8' "
                                         r"\(1 slice\)"):
        load_volume(series(tmp_path / "depths", 3, eight_bits))
