"""What the files of a DICOM scan must hold before their pixels are stacked and shown to the model.

GDCM (SimpleITK's DICOM reader) trusts the header: pixel data that does not fit Rows x
Columns x frames comes back as a squashed, stretched or half-black image, and a series is
stacked whatever its files hold (two patients, two images at one position, slices of two
sizes). Here pydicom reads each header (the pixel data stays on disk: only its length, or
for compressed data its frames' own sizes, is read), so such files are refused, naming
them, before any pixels are read; what is usable but odd becomes a note.
"""

from __future__ import annotations

import filecmp
import math
import os
import struct
from collections import Counter, defaultdict
from typing import NamedTuple

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import JPEG2000TransferSyntaxes, RLELossless

from ..errors import ImageError

_CROSS_SECTIONAL = ("CT", "MR", "PT", "NM")
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_SAME_ACROSS_SERIES = (("PatientID", "patients"), ("StudyInstanceUID", "studies"),
                       ("FrameOfReferenceUID", "frames of reference"), ("Modality", "modalities"),
                       ("PhotometricInterpretation", "photometric interpretations"),  # MONOCHROME1 is inverted
                       ("BitsAllocated", "pixel depths"))  # GDCM rescales the odd ones wrongly


def read_header(path: str) -> pydicom.Dataset:
    """A DICOM file's header; the pixel data is left on disk (its length and position are kept)."""
    try:
        return pydicom.dcmread(path, defer_size=1024, force=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, struct.error) as e:
        raise ImageError(f"Cannot read the DICOM header of {path} ({e}); copy or export the file again.") from None


def _name(path: str) -> str:
    return os.path.basename(path)


class _Layout(NamedTuple):
    """How the header says the pixels are laid out."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits: int

    @classmethod
    def of(cls, path: str, ds) -> "_Layout":
        """The header's numbers, each a positive whole number, or the file is refused naming the field."""
        values = []
        for key, default in (("Rows", None), ("Columns", None), ("NumberOfFrames", 1), ("SamplesPerPixel", 1),
                             ("BitsAllocated", None)):
            raw = ds.get(key)
            if raw in (None, "") and default is None:
                raise ImageError(f"{path}: its header lacks {key}: its pixels cannot be laid out; "
                                 "export the file again.")
            try:
                value = default if raw in (None, "") else int(str(raw).strip())
            except ValueError:
                value = 0
            if value <= 0:
                raise ImageError(f"{path}: its {key} {str(raw)!r} is not a positive whole number: its pixels "
                                 "cannot be laid out; export the file again.")
            values.append(value)
        return cls(*values)

    def __str__(self) -> str:
        """E.g. "128x128 pixels, 2 frames, 3 samples of 16 bits" (rows x columns, as DICOM gives them)."""
        text = f"{self.rows}x{self.columns} pixels" + (f", {self.frames} frames" if self.frames != 1 else "")
        return text + (f", {self.samples} samples" if self.samples != 1 else "") + f" of {self.bits} bits"


def check_pixel_data(path: str, ds) -> list:
    """Refuse pixel data that does not fit the header (per instance); notes for zero padding."""
    tag = next((t for t in _PIXEL_TAGS if t in ds), None)
    if tag is None:
        raise ImageError(f"{path} holds no pixel data (a DICOM {ds.get('Modality') or ''} object without an "
                         "image: a report, a structure set?); give the image files.")
    layout = _Layout.of(path, ds)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    element = ds.get_item(tag, keep_deferred=True)
    held = element.length
    if (syntax is not None and syntax.is_compressed) or held == 0xFFFFFFFF:  # undefined length: encapsulated
        _check_compressed(path, ds, syntax, layout)
        return []
    expected = get_expected_length(ds, "bytes")
    if held == expected or (held == expected + 1 and expected % 2):  # one byte pads an odd length
        return []
    holds = f"{held:,} bytes, i.e. {held * 8 / (layout.columns * layout.samples * layout.bits):.4g} rows of " \
            f"{layout.columns}"
    if held > expected and not np.frombuffer(_excess(path, element, expected, held), np.uint8).any():
        return [f"{held - expected:,} bytes of zero padding after the pixels ignored"]
    raise ImageError(f"{path}: its pixel data does not fit its header: the header says {layout} "
                     f"({expected:,} bytes) but the pixel data holds {holds}; the file is cut or its "
                     "header was edited: export it again.")


def _excess(path, element, expected, held) -> bytes:
    if element.value is not None:
        return bytes(element.value[expected:held])
    with open(path, "rb") as f:
        f.seek(element.value_tell + expected)
        return f.read(held - expected)


def _check_compressed(path, ds, syntax, layout: _Layout) -> None:
    """Compressed pixel data: as many frames as the header says, each of the header's size."""
    try:
        held = list(generate_frames(ds.PixelData, number_of_frames=layout.frames))
    except (ValueError, struct.error, EOFError) as e:
        raise ImageError(f"{path}: its compressed pixel data cannot be split into frames ({e}); "
                         "export the file again.") from None
    if len(held) != layout.frames:
        raise ImageError(f"{path}: its header says {layout} but its compressed pixel data holds "
                         f"{len(held)} frame{'s' if len(held) != 1 else ''}; export the file again.")
    for k, frame in enumerate(held):
        size = _frame_size(frame, syntax)
        if size is not None and size != (layout.rows, layout.columns):
            raise ImageError(f"{path}: its header says {layout} but its compressed frame {k + 1} is "
                             f"{size[0]}x{size[1]} pixels; the header was edited or the file is damaged: "
                             "export it again.")
        if syntax == RLELossless:
            segments = struct.unpack_from("<I", frame)[0] if len(frame) >= 64 else 0
            wanted = layout.samples * layout.bits // 8
            if segments != wanted:
                raise ImageError(f"{path}: its header says {layout} ({wanted} RLE segments a frame) but "
                                 f"frame {k + 1} holds {segments}; export the file again.")
            pixels = _rle_segment_length(frame)
            if pixels not in (layout.rows * layout.columns, layout.rows * layout.columns + 1):  # + an even pad
                raise ImageError(f"{path}: its header says {layout} ({layout.rows * layout.columns:,} pixels a "
                                 f"frame) but its compressed frame {k + 1} holds {pixels:,} pixels, i.e. "
                                 f"{pixels / layout.columns:.4g} rows of {layout.columns}; export the file again.")


def _rle_segment_length(frame: bytes) -> int:
    """How many bytes (one per pixel) a frame's first RLE segment decodes to, without decoding it.

    The first segment is the most significant byte of each pixel: long runs, so a short walk.
    """
    start, end = struct.unpack_from("<2I", frame, 4)
    end = end or len(frame)
    at, length = start, 0
    while at < end:
        n = frame[at]
        if n < 128:  # n + 1 literal bytes follow
            length, at = length + n + 1, at + n + 2
        elif n > 128:  # the next byte, 257 - n times
            length, at = length + 257 - n, at + 2
        else:  # 128: no operation
            at += 1
    return length


def _frame_size(frame: bytes, syntax) -> "tuple | None":
    """(rows, columns) a JPEG, JPEG-LS or JPEG 2000 codestream declares; None for RLE (no size in it)."""
    if syntax in JPEG2000TransferSyntaxes:
        at = frame.find(b"\xff\x4f\xff\x51")  # start of codestream, then the SIZ marker
        if at < 0 or len(frame) < at + 24:
            return None
        x, y, x0, y0 = struct.unpack_from(">4I", frame, at + 8)
        size = (y - y0, x - x0)
        return size if all(0 < n <= 65535 for n in size) else None  # not a codestream after all: GDCM says
    at = 2
    while at + 9 <= len(frame):  # JPEG markers up to the start of frame (SOF0-15 but DHT/JPG/DAC, or JPEG-LS SOF55)
        if frame[at] != 0xFF:
            return None
        marker = frame[at + 1]
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            rows, cols = struct.unpack_from(">HH", frame, at + 5)
            return rows, cols
        at += 2 + struct.unpack_from(">H", frame, at + 2)[0]
    return None


def check_geometry(path: str, ds, modality=None) -> list:
    """A pixel size or orientation that is not one is refused (GDCM would put 1 mm, axial); a missing one noted."""
    notes = []
    orientation = ds.get("ImageOrientationPatient")
    if orientation in (None, ""):
        if modality in _CROSS_SECTIONAL:
            notes.append(f"{_name(path)} gives no orientation (no ImageOrientationPatient): taken as axial, so the "
                         "plane and the patient's sides may be wrong")
    else:
        values = _numbers(orientation)
        row, col = np.array(values[:3]), np.array(values[3:])
        if len(values) != 6 or not np.isfinite(values).all() or abs(np.linalg.norm(row) - 1) > 0.01 \
                or abs(np.linalg.norm(col) - 1) > 0.01 or abs(row @ col) > 0.01:
            raise ImageError(f"{path}: its ImageOrientationPatient {_text(orientation)} is not two perpendicular "
                             "unit vectors: the plane and the patient's sides cannot be known (the reader would "
                             "take it as axial); fix the header or export the file again.")
    return notes + _pixel_size_notes(path, ds)


def has_pixel_size(ds) -> bool:
    """Whether the header gives a pixel size in the patient, in mm (PixelSpacing; an X-ray's
    ImagerPixelSpacing is at the detector, magnified, and GDCM does not always use it)."""
    return ds.get("PixelSpacing") not in (None, "")


def _pixel_size_notes(path: str, ds) -> list:
    if not has_pixel_size(ds):
        return [f"{_name(path)} gives no pixel size (no PixelSpacing): sizes are told in pixels, not mm"]
    spacing = ds.get("PixelSpacing")
    values = _numbers(spacing)
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ImageError(f"{path}: its PixelSpacing {_text(spacing)} is not a pixel size (two positive numbers "
                         "of mm): no size in mm can be given; fix the header or export the file again.")
    return []


def in_scanner_units(ds) -> bool:
    """False where the reader changes the values (MONOCHROME1 inverted, colour made gray): a CT window is no use."""
    return (str(ds.get("PhotometricInterpretation") or "").strip() != "MONOCHROME1"
            and str(ds.get("SamplesPerPixel") or 1).strip() == "1")


def photometric_notes(ds, modality) -> list:
    """What the reader did to the values that makes them other than the scanner's units."""
    kind = str(ds.get("PhotometricInterpretation") or "").strip()
    units = "Hounsfield units" if modality == "CT" else "the scanner's units"
    window = "; windowed by percentile, not as CT" if modality == "CT" else ""
    if kind == "MONOCHROME1":
        return [f"MONOCHROME1 image (its lowest values are shown white): the reader inverted its values, "
                f"so white is high as usual; they are no longer {units}{window}"]
    if not in_scanner_units(ds) and modality in _CROSS_SECTIONAL:
        return [f"a colour ({kind}) {modality} image: a screen capture or rendering, not {units}; "
                f"read as gray levels{window}"]
    return []


def _numbers(value) -> list:
    values = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return []


def _text(value) -> str:
    values = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    return "\\".join(str(v) for v in values)


def _counted(counts: Counter, what="slice") -> str:
    return ", ".join(f"{value} ({n} {what}{'s' if n != 1 else ''})" for value, n in counts.most_common())


def check_rescale(path: str, ds) -> None:
    """A rescale that is not a number is refused: GDCM silently drops it (a NaN intercept: raw values, not HU)."""
    for key in ("RescaleSlope", "RescaleIntercept"):
        raw = ds.get(key)
        if raw in (None, ""):
            continue
        values = _numbers(raw)
        if len(values) != 1 or not math.isfinite(values[0]) or (key == "RescaleSlope" and values[0] == 0):
            raise ImageError(f"{path}: its {key} {_text(raw)!r} is not a usable number: the reader would drop it, "
                             "and the values (Hounsfield units on a CT) would be wrong; fix the header or export "
                             "the file again.")


def check_instance(path: str, ds, modality=None) -> list:
    """Every check on one file: its pixel data, rescale, pixel size and photometric interpretation."""
    notes = check_pixel_data(path, ds)
    check_rescale(path, ds)
    return notes + check_geometry(path, ds, modality) + photometric_notes(ds, modality)


def check_series(folder: str, files: list) -> "tuple[list, list, list]":
    """Refuse a series whose files must not be one volume; drop byte-identical copies of a slice.

    Returns the files to stack, their headers, and notes.
    """
    headers = [read_header(f) for f in files]
    label = f"The DICOM series {headers[0].get('SeriesInstanceUID', '')} in {folder}"
    for key, what in _SAME_ACROSS_SERIES:
        counts = Counter(f"{key} {str(ds.get(key) or '(none)')!r}" for ds in headers)
        if len(counts) > 1:
            raise ImageError(f"{label} mixes {what}: {_counted(counts)}; slices of different {what} are never "
                             f"stacked into one volume: put each {key}'s files in their own folder.")
    sizes = Counter(f"{ds.get('Rows')}x{ds.get('Columns')}" for ds in headers)
    if len(sizes) > 1:
        examples = {}
        for f, ds in zip(files, headers):
            examples.setdefault(f"{ds.get('Rows')}x{ds.get('Columns')}", _name(f))
        raise ImageError(f"{label} holds slices of {len(sizes)} sizes: {_counted(sizes)} (e.g. "
                         f"{', '.join(f'{k}: {v}' for k, v in examples.items())}); they are not one volume: put "
                         "the slices of one size in their own folder and give that folder, or give one file.")
    multi = [(f, layout.frames) for f, layout in zip(files, (_Layout.of(f, ds) for f, ds in zip(files, headers)))
             if layout.frames > 1]
    if multi and len(files) > 1:
        f, n = multi[0]
        raise ImageError(f"{label} mixes multi-frame files ({_name(f)}: {n} frames) with other files: they are "
                         "not one stack of slices; give the multi-frame file itself.")
    spacings = Counter(f"PixelSpacing {_text(ds.get('PixelSpacing') or '(none)')}" for ds in headers)
    if len({tuple(np.round(_numbers(ds.get("PixelSpacing") or []), 4)) for ds in headers}) > 1:
        raise ImageError(f"{label} mixes pixel sizes: {_counted(spacings)}; stacked as one volume, some slices "
                         "would be shown at the wrong size: put each pixel size's files in their own folder.")
    orientations = [_numbers(ds.get("ImageOrientationPatient") or []) for ds in headers]
    first = orientations[0]
    for f, ds, o in zip(files, headers, orientations):
        if len(first) == 6 and len(o) == 6 and not np.allclose(first, o, atol=1e-3):
            raise ImageError(f"{label} mixes slice orientations ({_text(headers[0].ImageOrientationPatient)} "
                             f"in {_name(files[0])}, {_text(ds.ImageOrientationPatient)} in {_name(f)}): it is not "
                             "one 3D volume (a radial or localizer series?); pick one slice file or another "
                             "series (--series).")
    files, headers, notes = _without_copies(label, files, headers)
    unplaced = sum(len(_numbers(ds.get("ImagePositionPatient") or [])) != 3 for ds in headers)
    if unplaced and len(files) > 1:
        notes.append(f"{unplaced} of {len(files)} slices give no position (ImagePositionPatient): stacked in the "
                     "reader's order, with a guessed distance between slices; distances across slices are not real")
    for f, ds in zip(files, headers):
        notes += check_instance(f, ds, str(ds.get("Modality") or "") or None)
    return files, headers, list(dict.fromkeys(notes))  # a note true of every slice is given once


def _without_copies(label, files, headers):
    """Slices at one position: byte-identical copies are dropped (noted); different images are refused."""
    at = defaultdict(list)
    for i, ds in enumerate(headers):
        position = _numbers(ds.get("ImagePositionPatient") or [])
        if len(position) == 3:
            at[tuple(round(v, 2) for v in position)].append(i)
    dropped = set()
    for position, indices in at.items():
        if len(indices) < 2:
            continue
        where = "({:g}, {:g}, {:g}) mm".format(*position)
        names = ", ".join(_name(files[i]) for i in indices)
        if not all(filecmp.cmp(files[indices[0]], files[i], shallow=False) for i in indices[1:]):
            raise ImageError(f"{label} has {len(indices)} different images at the same position {where}: {names} "
                             "(two echoes, phases or acquisitions in one series?); they are not one volume: put "
                             "each acquisition's files in their own folder.")
        dropped.update(indices[1:])
    if not dropped:
        return files, headers, []
    kept = [i for i in range(len(files)) if i not in dropped]
    copies = ", ".join(_name(files[i]) for i in sorted(dropped))
    note = (f"{len(dropped)} file{'s' if len(dropped) != 1 else ''} ignored as byte-identical copies of another "
            f"slice at the same position: {copies}")
    return [files[i] for i in kept], [headers[i] for i in kept], [note]


def rescale_text(headers) -> "str | None":
    """The headers' rescale, e.g. "RescaleSlope 1e+30 and RescaleIntercept -1024"; None when values are kept."""
    slopes = Counter(_text(ds.get("RescaleSlope", "1")) for ds in headers)
    intercepts = Counter(_text(ds.get("RescaleIntercept", "0")) for ds in headers)
    if all(_numbers(v) == [1.0] for v in slopes) and all(_numbers(v) == [0.0] for v in intercepts):
        return None
    return f"RescaleSlope {', '.join(slopes)} and RescaleIntercept {', '.join(intercepts)}"
