"""An answer as a DICOM Structured Report, so a draft joins its study in the record.

IHE AI Results asks for a Comprehensive 3D SR with TID 1500 ("Imaging Measurement Report")
at its root, referencing the images the result was computed from: :func:`structured_report`
builds it with highdicom, or a Basic Text SR (TID 2000 "Diagnostic Imaging Report") for
systems that show only text. Either way the SR copies patient and study from the source
instances, opens a new series in that study, and is a draft: CompletionFlag PARTIAL,
VerificationFlag UNVERIFIED, whoever edited the text.

Content (both kinds): RadFM as the device observer; the task, the question, the answer as
it stands (and a report's findings and impression as their own items), whether the reader
edited it, and the research-use notice as TEXT items. The Comprehensive 3D SR adds the
algorithm (RadFM, the checkpoint fingerprint as its version, precision and generation
settings as parameters) and each marked region as an ROI group whose outline (the first and
last slice of the close-up the model was shown) is in the scan's frame of reference.

:func:`attention_map` writes the resampler's attention over a DICOM scan as a Parametric Map
in the same study, labelled as attention, so a PACS viewer can overlay where the model looked.
"""

from __future__ import annotations

import io
import os
import re

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from . import storage
from .errors import RecordError
from .imaging.dicom_source import headers_for, read_header
from .session import DISCLAIMER, Turn

KINDS = ("comprehensive3d", "text")
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SERIES_NUMBER = 9901  # a number outside the scanner's usual range, so the draft's series stands apart
MANUFACTURER = "RadFMSlicer"

# Items no standard code names: a private coding scheme, identified in the SR itself.
SCHEME = "99RADFM"
TASK = hd.sr.CodedConcept("TASK", SCHEME, "Task")
QUESTION = hd.sr.CodedConcept("QUESTION", SCHEME, "Question")
ANSWER = hd.sr.CodedConcept("ANSWER", SCHEME, "Answer")
MODEL_ANSWER = hd.sr.CodedConcept("MODELANSWER", SCHEME, "Answer as the model wrote it")
EDITED_BY = hd.sr.CodedConcept("EDITEDBY", SCHEME, "Text edited by")
REGION = hd.sr.CodedConcept("REGION", SCHEME, "Marked region")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
DIAGNOSTIC_IMAGING_REPORT = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
_SCHEMES = [hd.coding_schemes.CodingSchemeIdentificationItem(SCHEME, name="RadFMSlicer answer items",
                                              responsible_organization=MANUFACTURER)]
_PROCEDURES = {"CT": codes.LN.CTUnspecifiedBodyRegion, "MR": codes.LN.MRIUnspecifiedBodyRegion}
_SECTIONS = re.compile(r"(?im)^\W*(findings|impressions?)\s*:\s*")


def check_request(image_paths, out_path=None, kind: str = KINDS[0], flag: str = "--sr",
                  what: str = "report") -> None:
    """Before any model work: a known kind, each scan DICOM (a report joins its study), ``out_path`` writable."""
    _check_kind(kind)
    for path in image_paths:
        path = os.fspath(path)
        if os.path.isfile(path) and read_header(path) is None:
            raise RecordError(f"{path} is not DICOM: a DICOM {what} joins the "
                              "patient's study, and a NIfTI, NRRD or PNG file has none; give the DICOM series "
                              f"folder it came from, or leave out {flag}")
    if out_path is not None:
        storage.check_writable(out_path, "DICOM report")


def structured_report(turn: Turn, sources=None, kind: str = "comprehensive3d") -> pydicom.Dataset:
    """The SR of ``turn``: ``sources`` are the headers of the DICOM instances the model read
    (default: read again from the files the turn's scans came from, where patient identity lives)."""
    _check_kind(kind)
    scans = [image for image in turn.images if image.role != "region"]
    plain = [image.label for image in scans if not image.dicom]
    if not scans or plain:
        raise RecordError(f"{', '.join(plain) or 'the answer'} was not read from DICOM: a DICOM report "
                          "needs the patient's study to join")
    if not turn.text.strip():
        raise RecordError("the answer is empty: there is nothing to report")
    evidence = _evidence(scans, sources)
    items = _text_items(turn)
    try:
        if kind == "text":
            return _basic_text_sr(turn, evidence, items)
        return _comprehensive_3d_sr(turn, evidence, items)
    except (ValueError, AttributeError) as exc:  # highdicom's checks of the source headers and content
        raise RecordError(f"the DICOM report could not be built from {scans[0].label}: {exc}") from None


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise RecordError(f"unknown DICOM report kind {kind!r} (--sr-kind): choose {' or '.join(KINDS)}")


def write(dataset: pydicom.Dataset, path) -> None:
    """The SR as a DICOM file (Part 10, with its meta header), written atomically."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    storage.write_bytes(path, buffer.getvalue())


def _evidence(scans, sources) -> list:
    """The headers of every instance the model read, the current scan's first (its study is the SR's)."""
    by_uid = {str(h.SOPInstanceUID): h for h in sources} if sources is not None else None
    evidence = []
    for image in scans:
        uids = [uid for _, uid in image.dicom["instances"]]
        if by_uid is None:
            evidence += headers_for(image.dicom["files"], uids)
            continue
        missing = [uid for uid in uids if uid not in by_uid]
        if missing:
            raise RecordError(f"the DICOM sources given lack {len(missing)} instance(s) {image.label} was read "
                              f"from (e.g. {missing[0]})")
        evidence += [by_uid[uid] for uid in uids]
    return evidence


def _text_items(turn: Turn) -> list:
    """The narrative: task, question, the answer as it stands, its report sections, who edited it, the notice."""
    items = [hd.sr.TextContentItem(TASK, turn.task, "CONTAINS"),
             hd.sr.TextContentItem(QUESTION, turn.question, "CONTAINS"),
             hd.sr.TextContentItem(ANSWER, turn.text, "CONTAINS")]
    sections = report_sections(turn.text)
    for key, name in (("findings", codes.DCM.Finding), ("impression", codes.DCM.Impression)):
        if sections.get(key):
            items.append(hd.sr.TextContentItem(name, sections[key], "CONTAINS"))
    if turn.edited:
        items += [hd.sr.TextContentItem(EDITED_BY, turn.edits[-1]["by"], "CONTAINS"),
                  hd.sr.TextContentItem(MODEL_ANSWER, turn.answer or "(no answer)", "CONTAINS")]
    for image in turn.images:
        if image.role == "region" and image.facts:
            items.append(hd.sr.TextContentItem(REGION, image.facts, "CONTAINS"))
    items.append(hd.sr.TextContentItem(codes.DCM.Comment, DISCLAIMER, "CONTAINS"))
    return items


def report_sections(text: str) -> dict:
    """A report's "Findings:" and "Impression:" parts, by their headings (empty when it has none)."""
    parts = _SECTIONS.split(text)
    sections = {}
    for heading, body in zip(parts[1::2], parts[2::2]):
        key = "findings" if heading.lower() == "findings" else "impression"
        if body.strip():
            sections[key] = body.strip()
    return sections


def _observer(turn: Turn) -> hd.sr.ObservationContext:
    """RadFM as the device observer; its UID follows from the checkpoint, so one model is one device."""
    model = turn.provenance.get("model") or {}
    fingerprint = model.get("checkpoint_fingerprint") or "unknown"
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["RadFM", fingerprint]), name="RadFM", manufacturer_name=MANUFACTURER,
        model_name="RadFM")
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def _algorithm(turn: Turn) -> hd.sr.AlgorithmIdentification:
    """RadFM, its checkpoint fingerprint as the version, precision and generation settings as parameters."""
    model = turn.provenance.get("model") or {}
    settings = turn.provenance.get("settings") or {}
    parameters = [f"{key}={model[key]}" for key in ("dtype", "quantization", "device") if model.get(key)]
    parameters += [f"{key}={value}" for key, value in settings.items() if value is not None]
    return hd.sr.AlgorithmIdentification(name="RadFM", version=str(model.get("checkpoint_fingerprint") or "unknown"),
                                         parameters=parameters or None)


def _region_groups(turn: Turn, algorithm) -> list:
    """Each marked region as an ROI group: the outline of its close-up in the frame of reference,
    a volume surface (its first and last slice) or, for a one-slice close-up, a planar polygon."""
    groups = []
    for image in turn.images:
        frame = (image.dicom or {}).get("frame_of_reference_uid")
        if image.role != "region" or not frame:
            continue
        faces = image.dicom["outline_lps"]
        common = dict(tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=image.label),
                      algorithm_id=algorithm)
        if faces[0] == faces[-1]:
            region = hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
                                         graphic_data=_closed(faces[0]), frame_of_reference_uid=frame)
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common))
            continue
        surface = hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.POLYGON, graphic_data=[_closed(face) for face in faces],
            frame_of_reference_uid=frame,
            source_series=hd.sr.SourceSeriesForSegmentation(image.dicom["series_instance_uid"]))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_volume_surface=surface,
                                                                               **common))
    return groups


def _closed(face) -> np.ndarray:
    return np.array(face + face[:1], dtype=float)  # a DICOM polygon ends where it starts


def _procedure(evidence) -> hd.sr.CodedConcept:
    return _PROCEDURES.get(str(evidence[0].get("Modality", "")), codes.SCT.ImagingProcedure)


def _document_attributes(turn: Turn, evidence) -> dict:
    """What both kinds share: a new series in the source study, a draft, by RadFMSlicer."""
    return dict(evidence=evidence, series_instance_uid=generate_uid(), series_number=SERIES_NUMBER,
                sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
                is_complete=False, is_final=False, is_verified=False, coding_schemes=_SCHEMES,
                series_description="RadFM draft (research use, unverified)",
                specific_character_set="ISO_IR 192",  # UTF-8: a model's text is any Unicode, not the source's Latin-1
                performed_procedure_codes=[_procedure(evidence)])


def _comprehensive_3d_sr(turn: Turn, evidence, items) -> pydicom.Dataset:
    algorithm = _algorithm(turn)
    answer_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="RadFM answer"),
        algorithm_id=algorithm)
    report = hd.sr.MeasurementReport(
        observation_context=_observer(turn), procedure_reported=_procedure(evidence),
        imaging_measurements=[answer_group, *_region_groups(turn, algorithm)])
    narrative = hd.sr.ContainerContentItem(QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
    narrative.ContentSequence = hd.sr.ContentSequence(items)
    report[0].ContentSequence.append(narrative)
    return hd.sr.Comprehensive3DSR(content=report[0], **_document_attributes(turn, evidence))


def _basic_text_sr(turn: Turn, evidence, items) -> pydicom.Dataset:
    """A Basic Text SR: highdicom has no class for it; its SR base builds the same modules for any SR class."""
    root = hd.sr.ContainerContentItem(DIAGNOSTIC_IMAGING_REPORT, template_id="2000")
    root.ContentSequence = hd.sr.ContentSequence([*_observer(turn), *items])
    return hd.sr.sop._SR(content=root, sop_class_uid=BASIC_TEXT_SR, **_document_attributes(turn, evidence))


def attention_map(voxels_kji, volume, label: str) -> pydicom.Dataset:
    """The attention map (``[k, j, i]`` on ``volume``'s original grid, 0..1) as a DICOM Parametric Map
    over the instances the volume was read from: same study, a new series, labelled as attention
    (``label``: what the map is, :data:`~RadFMSlicer.attention.LABEL`)."""
    if volume.dicom is None:
        raise RecordError(f"{volume.source} was not read from DICOM: a DICOM attention map needs the study to join; "
                          "name the map .nii.gz instead")
    mapping = hd.pm.RealWorldValueMapping(lut_label="ATTENTION", lut_explanation=f"RadFM {label}",
                                          unit=codes.UCUM.NoUnits, value_range=(0.0, 1.0), intercept=0, slope=1)
    try:
        pm = hd.pm.ParametricMap(
            source_images=list(volume.dicom.headers), pixel_array=np.asarray(voxels_kji, np.float32),
            series_instance_uid=generate_uid(), series_number=SERIES_NUMBER + 1, sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name="RadFM",
            software_versions=MANUFACTURER, device_serial_number="none", contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping], content_label="ATTENTION",
            content_description=f"RadFM {label}"[:64], series_description=f"RadFM {label}"[:64],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)])
    except (ValueError, AttributeError, TypeError) as exc:
        raise RecordError(f"the DICOM attention map could not be built from {volume.source}: {exc}") from None
    if "Laterality" not in pm:
        pm.Laterality = ""  # General Series, type 2C: unknown (dciodvfy asks for it)
    return pm
