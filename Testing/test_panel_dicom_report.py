"""The panel's Export -> "Last answer as DICOM SR...": the reader edits the draft, the SR carries the
edited text and says so, the conversation keeps both texts, and the file goes into the DICOM database."""

import dataclasses
import json

import pydicom
from test_panel import open_panel, store, wait_idle  # noqa: F401 (fixtures); first: it puts RadFMModule on the path

from RadFMModuleLib import chat_panel  # noqa: E402
from RadFMSlicer.testing import write_ct_series  # noqa: E402
from panel_scene import FakeScene  # noqa: E402
from scripted_worker import tokens  # noqa: E402
from test_dicom_report import dciodvfy_errors, text_items  # noqa: E402

ANSWER = "Findings: the lungs are clear. Impression: no acute abnormality."
EDITED = "Findings: the lungs are clear.\nImpression: normal chest CT."


class DicomScene(FakeScene):
    """The plain-Python scene, its volumes loaded from a DICOM series (as Slicer's DICOM module does)."""

    def __init__(self, files):
        super().__init__()
        self.files = tuple(str(f) for f in files)
        self.imported = []

    def volume(self, volume_id):
        return dataclasses.replace(super().volume(volume_id), dicom_files=self.files)

    def import_dicom(self, path):
        self.imported.append(pydicom.dcmread(path).SOPInstanceUID)
        return True


def export_through_the_menu(panel, monkeypatch, edited, path):
    monkeypatch.setattr(chat_panel, "ask_edited_text", lambda parent, caption, label, text: edited)
    monkeypatch.setattr(chat_panel, "ask_save_path", lambda *args: str(path))
    [action] = [a for a in panel.export_button.menu().actions() if "DICOM SR" in a.text()]
    action.trigger()


def test_the_edited_draft_is_exported_as_an_unverified_sr_in_the_study(open_panel, qtbot, tmp_path, monkeypatch):
    files = write_ct_series(tmp_path / "ct", 8)
    panel, scene, _ = open_panel(tokens(ANSWER), scene=DicomScene(files))
    panel.ask("report")
    wait_idle(qtbot, panel)

    export_through_the_menu(panel, monkeypatch, EDITED, tmp_path / "draft.dcm")
    assert panel.status_label.text() == ("Draft saved as DICOM SR draft.dcm (unverified, edited by the reader) "
                                         "and added to the DICOM database")
    assert dciodvfy_errors(tmp_path / "draft.dcm") == []
    sr = pydicom.dcmread(tmp_path / "draft.dcm")
    texts = text_items(sr)
    assert texts["Answer"] == [EDITED] and texts["Answer as the model wrote it"] == [ANSWER]
    assert texts["Text edited by"] == ["reader"] and texts["Impression"] == ["normal chest CT."]
    assert (sr.VerificationFlag, sr.StudyInstanceUID) == ("UNVERIFIED", pydicom.dcmread(files[0]).StudyInstanceUID)
    assert scene.imported == [sr.SOPInstanceUID]
    [saved] = json.loads(scene.saved)["turns"]  # the conversation in the scene keeps both texts, and who wrote each
    assert saved["answer"] == ANSWER and [(e["by"], e["text"]) for e in saved["edits"]] == [("reader", EDITED)]


def test_a_scan_not_from_dicom_is_told_and_nothing_is_written(open_panel, qtbot, tmp_path, monkeypatch):
    panel, scene, _ = open_panel(tokens(ANSWER))
    panel.ask("report")
    wait_idle(qtbot, panel)
    export_through_the_menu(panel, monkeypatch, None, tmp_path / "cancelled.dcm")  # the edit cancelled: nothing
    export_through_the_menu(panel, monkeypatch, ANSWER, tmp_path / "draft.dcm")
    assert "CT chest 2024-03-01 was not read from DICOM" in panel.status_label.text()
    assert list(tmp_path.glob("*.dcm*")) == []
