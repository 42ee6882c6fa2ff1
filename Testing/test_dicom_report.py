"""The DICOM Structured Report of an answer: it validates (dciodvfy), highdicom reads it back,
and the text, the source references and the regions' coordinates come back exactly."""

import os
import shutil
import subprocess

import highdicom as hd
import nibabel
import numpy as np
import pydicom
import pytest

from RadFMSlicer import dicom_report
from RadFMSlicer.ask import AskRequest, ImageInput, RegionInput, ask
from RadFMSlicer.errors import ImageError, RecordError
from RadFMSlicer.session import DISCLAIMER, Session
from RadFMSlicer.testing import write_ct_series

NIFTI = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
REPORT = "Findings: the lungs are clear. No pleural effusion.\nImpression: no acute abnormality."


def dciodvfy_errors(path) -> list:
    """The errors dicom3tools' validator finds in a DICOM file (its warnings are not errors)."""
    assert shutil.which("dciodvfy"), "dciodvfy not found: install the Debian package dicom3tools"
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def text_items(dataset) -> dict:
    """Concept meaning -> TEXT values, anywhere in the content tree."""
    found = {}
    for item in dataset.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            found.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(item.TextValue)
        for key, values in text_items(item).items():
            found.setdefault(key, []).extend(values)
    return found


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    return write_ct_series(tmp_path_factory.mktemp("ct") / "series", slices=8)


@pytest.fixture(scope="module")
def turn(engine, series):
    request = AskRequest(task="report", images=[ImageInput(path=str(series[0].parent))],
                         regions=[RegionInput(name="box 1", box_ijk=[[10, 10, 2], [40, 50, 5]])])
    request.settings.max_new_tokens = 6
    return ask(engine, request)


def test_image_record_names_the_dicom_instances_the_model_read(turn, series):
    record = turn.images[0].dicom
    first = pydicom.dcmread(series[0])
    assert sorted(uid for _, uid in record["instances"]) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in series)
    assert record["study_instance_uid"] == first.StudyInstanceUID
    assert record["frame_of_reference_uid"] == first.FrameOfReferenceUID
    assert str(first.PatientName) not in str(record) and first.PatientID not in str(record)  # identity stays in DICOM
    assert sorted(record["files"]) == sorted(str(p.resolve()) for p in series)
    assert turn.images[1].role == "region" and turn.images[1].dicom["series_instance_uid"] == first.SeriesInstanceUID


def test_comprehensive_3d_sr_validates_and_round_trips(turn, series, tmp_path):
    turn = Session.from_json(Session(turns=[turn]).to_json()).turns[0]  # as a saved session gives it back
    path = tmp_path / "sr.dcm"
    dicom_report.write(dicom_report.structured_report(turn), path)

    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    source = pydicom.dcmread(series[0])
    assert isinstance(sr, hd.sr.Comprehensive3DSR) and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert (sr.VerificationFlag, sr.CompletionFlag) == ("UNVERIFIED", "PARTIAL")
    assert (sr.PatientID, sr.PatientName, sr.StudyInstanceUID) == (source.PatientID, source.PatientName,
                                                                   source.StudyInstanceUID)
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID  # same study, its own series

    texts = text_items(sr)
    assert texts["Task"] == ["report"] and texts["Question"] == [turn.question]
    assert texts["Answer"] == [turn.answer] and texts["Comment"] == [DISCLAIMER]
    assert "Text edited by" not in texts

    evidence = {ref.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for s in study.ReferencedSeriesSequence for ref in s.ReferencedSOPSequence}
    assert evidence == {pydicom.dcmread(p).SOPInstanceUID for p in series}

    report = sr.content
    assert texts["Device Observer Name"] == ["RadFM"]  # RadFM is the device observer
    groups = report.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["box 1"]
    surface = [item for item in groups[0].roi if item.ValueType == "SCOORD3D"]
    expected = [np.array(face + face[:1], dtype=np.float32) for face in turn.images[1].dicom["outline_lps"]]
    got = [np.asarray(item.GraphicData, dtype=np.float32).reshape(-1, 3) for item in surface]
    assert len(got) == 2 and all(np.array_equal(g, e) for g, e in zip(got, expected))
    assert {item.ReferencedFrameOfReferenceUID for item in surface} == {source.FrameOfReferenceUID}
    algorithm = text_items(groups[0][0])
    assert algorithm["Algorithm Name"] == ["RadFM"]
    assert algorithm["Algorithm Version"] == [turn.provenance["model"]["checkpoint_fingerprint"]]
    assert {"max_new_tokens=6", "dtype=float32"} <= set(algorithm["Algorithm Parameters"])


def test_reader_edit_is_carried_and_said_while_the_model_text_is_kept(turn, tmp_path):
    edited = Session.from_json(Session(turns=[turn]).to_json()).turns[0]
    edited.edit(REPORT)
    edited = Session.from_json(Session(turns=[edited]).to_json()).turns[0]  # the edit survives a save
    assert (edited.answer, edited.text, edited.edits[-1]["by"]) == (turn.answer, REPORT, "reader")

    path = tmp_path / "edited.dcm"
    dicom_report.write(dicom_report.structured_report(edited), path)
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    texts = text_items(sr)
    assert texts["Answer"] == [REPORT]
    assert texts["Finding"] == ["the lungs are clear. No pleural effusion."]
    assert texts["Impression"] == ["no acute abnormality."]
    assert texts["Text edited by"] == ["reader"] and texts["Answer as the model wrote it"] == [turn.answer]
    assert sr.VerificationFlag == "UNVERIFIED"  # an edit by the reader is not a signature
    markdown = Session(turns=[edited]).to_markdown()
    assert REPORT in markdown and turn.answer not in markdown and "Edited by the reader" in markdown


def test_basic_text_sr_validates_with_the_narrative_as_text(turn, series, tmp_path):
    edited = Session.from_json(Session(turns=[turn]).to_json()).turns[0]
    edited.edit(REPORT)
    path = tmp_path / "text.dcm"
    dicom_report.write(dicom_report.structured_report(edited, kind="text"), path)

    assert dciodvfy_errors(path) == []
    sr = pydicom.dcmread(path)
    assert sr.SOPClassUID == dicom_report.BASIC_TEXT_SR and sr.Modality == "SR"
    title = sr.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("18748-4", "LN",
                                                                                   "Diagnostic Imaging Report")
    assert (sr.VerificationFlag, sr.StudyInstanceUID) == ("UNVERIFIED", pydicom.dcmread(series[0]).StudyInstanceUID)
    texts = text_items(sr)
    assert texts["Answer"] == [REPORT] and texts["Impression"] == ["no acute abnormality."]
    assert {item.ValueType for item in sr.ContentSequence} <= {"TEXT", "CODE", "UIDREF"}  # no coordinates


def test_a_scan_that_is_not_dicom_is_refused_before_the_model(engine, tmp_path):
    with pytest.raises(RecordError, match=r"anatomical.nii is not DICOM: a DICOM report joins the patient's study"):
        dicom_report.check_request([NIFTI], tmp_path / "sr.dcm")
    request = AskRequest(task="vqa", question="What modality?", images=[ImageInput(path=NIFTI)])
    request.settings.max_new_tokens = 2
    nifti_turn = ask(engine, request)
    with pytest.raises(RecordError, match="was not read from DICOM"):
        dicom_report.structured_report(nifti_turn)


def test_a_series_gone_since_the_answer_is_named(turn, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(turn.images[0].source, moved)
    gone = Session.from_json(Session(turns=[turn]).to_json()).turns[0]
    gone.images[0].dicom["files"] = [str(moved / os.path.basename(f)) for f in gone.images[0].dicom["files"]]
    for path in sorted(moved.iterdir())[:2]:
        path.unlink()
    with pytest.raises(ImageError, match=r"2 of the 8 DICOM instances the model read are no longer in their files"):
        dicom_report.structured_report(gone)


def test_radfm_ask_writes_the_report_and_refuses_what_cannot_have_one_before_the_model(capsys, fixture_dir, series,
                                                                                       tmp_path):
    from RadFMSlicer.cli import main

    def ask(*extra):
        code = main(["ask", "--checkpoint", str(fixture_dir), "--max-new-tokens", "4", "--question", "Is it normal?",
                     *map(str, extra)])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = ask("--image", series[0].parent, "--sr", tmp_path / "text.dcm", "--sr-kind", "text")
    assert code == 0 and f"DICOM report (text, unverified draft): {tmp_path / 'text.dcm'}" in err
    sr = pydicom.dcmread(tmp_path / "text.dcm")
    assert dciodvfy_errors(tmp_path / "text.dcm") == [] and sr.SOPClassUID == dicom_report.BASIC_TEXT_SR
    assert text_items(sr)["Question"] == ["Is it normal?"] and text_items(sr)["Answer"] == [out.strip()]

    for extra, expected in [(("--image", NIFTI, "--sr", tmp_path / "n.dcm"), "anatomical.nii is not DICOM"),
                            (("--image", series[0].parent, "--sr", tmp_path / "no" / "sr.dcm"),
                             "cannot write DICOM report"),
                            (("--image", series[0].parent, "--sr", tmp_path / "k.dcm", "--sr-kind", "pdf"),
                             "unknown DICOM report kind 'pdf' (--sr-kind): choose comprehensive3d or text"),
                            (("--image", series[0].parent, "--store-sr", "pacs:8042"), "is not a web address"),
                            (("--image", series[0].parent, "--sr", ""), "--sr is empty")]:
        code, out, err = ask(*extra)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1 and "Loading" not in err, err
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == ["text.dcm"]  # nothing half-written


def test_a_one_slice_region_is_a_planar_roi_group(engine, tmp_path):
    from pydicom.data import get_testdata_file

    ct = tmp_path / "ct"
    ct.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), ct / "slice1.dcm")
    request = AskRequest(task="report", images=[ImageInput(path=str(ct))],
                         regions=[RegionInput(name="box 1", box_ijk=[[40, 40, 0], [80, 90, 0]])])
    request.settings.max_new_tokens = 2
    turn = ask(engine, request)
    path = tmp_path / "sr.dcm"
    dicom_report.write(dicom_report.structured_report(turn), path)
    assert dciodvfy_errors(path) == []
    [group] = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    face, last = turn.images[1].dicom["outline_lps"]
    assert group.tracking_identifier == "box 1" and face == last  # one slice: its first face is its last
    assert np.array_equal(np.asarray(group.roi.value, dtype=np.float32), np.array(face + face[:1], dtype=np.float32))


def test_a_scan_given_by_a_relative_path_is_reported_from_another_folder(engine, series, tmp_path, monkeypatch):
    monkeypatch.chdir(series[0].parent.parent)
    request = AskRequest(task="vqa", question="Is it normal?", images=[ImageInput(path=series[0].parent.name)])
    request.settings.max_new_tokens = 2
    turn = Session.from_json(Session(turns=[ask(engine, request)]).to_json()).turns[0]
    monkeypatch.chdir(tmp_path)  # a session reopened elsewhere
    sr = dicom_report.structured_report(turn)
    assert sr.StudyInstanceUID == pydicom.dcmread(series[0]).StudyInstanceUID


def test_the_attention_map_as_a_dicom_parametric_map_in_the_study(capsys, fixture_dir, series, tmp_path):
    import SimpleITK as sitk

    from RadFMSlicer.cli import main

    def ask(*extra):
        code = main(["ask", "--checkpoint", str(fixture_dir), "--max-new-tokens", "2", "--task", "report",
                     *map(str, extra)])
        return code, capsys.readouterr()[1]

    assert ask("--image", series[0].parent, "--attention", tmp_path / "map.nii.gz")[0] == 0
    code, err = ask("--image", series[0].parent, "--attention", tmp_path / "map.dcm")
    assert code == 0, err
    assert dciodvfy_errors(tmp_path / "map.dcm") == []
    pm = pydicom.dcmread(tmp_path / "map.dcm")
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and pm.ContentLabel == "ATTENTION"
    assert "not an explanation" in pm.ContentDescription
    assert pm.StudyInstanceUID == pydicom.dcmread(series[0]).StudyInstanceUID
    # the same values as the NIfTI map of the same ask, slice for slice by position
    nifti = sitk.ReadImage(str(tmp_path / "map.nii.gz"))
    values = sitk.GetArrayFromImage(nifti)
    z = [nifti.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(values.shape[0])]
    for frame, item in zip(pm.pixel_array, pm.PerFrameFunctionalGroupsSequence):
        k = int(np.argmin(np.abs(np.array(z) - float(item.PlanePositionSequence[0].ImagePositionPatient[2]))))
        assert np.array_equal(frame, values[k])

    code, err = ask("--image", NIFTI, "--attention", tmp_path / "nifti.dcm")
    assert code == 2 and "is not DICOM: a DICOM attention map joins the patient's study" in err and "Loading" not in err
