"""The Results tab under PySide6 (offscreen): a run's cases worst first, opened in the scene, asked again."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "RadFMModule"))

from RadFMModuleLib.qt_shim import QtCore  # noqa: E402
from RadFMModuleLib.results_view import ResultsView  # noqa: E402
from RadFMSlicer.errors import ImageError  # noqa: E402


class LoadingScene:
    """The one Scene call the Results tab makes: load a scan file, return its volume id."""

    def __init__(self):
        self.loaded = []

    def load_scan(self, path: str) -> str:
        if path.endswith("broken.nii"):
            raise ImageError(f"{path} is truncated")
        self.loaded.append(path)
        return f"vtkMRMLScalarVolumeNode{len(self.loaded)}"


@pytest.fixture
def run_folder(tmp_path) -> Path:
    (tmp_path / "previews").mkdir()
    Image.fromarray((np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)).save(tmp_path / "previews" / "a.png")
    seen = [{"label": "current study", "role": "current", "source": "/scans/a.nii", "shape": [3, 512, 512, 4],
             "preview_png": "previews/a.png"}]
    records = [
        {"id": "good", "task": "modality", "images": ["/scans/a.nii"], "reference": "CT", "answer": "CT.",
         "scores": {"accuracy": 1.0}, "seen": seen},
        {"id": "half", "task": "report", "images": ["/scans/a.nii"], "reference": "No effusion.",
         "answer": "Small effusion.", "scores": {"bleu": 30.0, "rougeL": 0.5}, "seen": seen},
        {"id": "wrong", "task": "diagnosis", "question": "pleural effusion", "images": ["/scans/a.nii"],
         "reference": "no", "answer": "Yes.", "scores": {"accuracy": 0.0}, "seen": seen},
        {"id": "crashed", "task": "modality", "images": ["/scans/broken.nii"], "reference": "MRI",
         "error": "broken.nii is truncated"},
    ]
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "summary.json").write_text(json.dumps({"cases": {"failed": 1}, "note": "toy checkpoint: noise"}))
    return tmp_path


def double_click(qtbot, view, row: int) -> None:
    centre = view.table.visualItemRect(view.table.item(row, 0)).center()
    qtbot.mouseClick(view.table.viewport(), QtCore.Qt.LeftButton, pos=centre)  # a press first, as a real double click
    qtbot.mouseDClick(view.table.viewport(), QtCore.Qt.LeftButton, pos=centre)


def test_cases_are_listed_worst_first_with_score_task_answer_and_reference(qtbot, run_folder):
    view = ResultsView(LoadingScene())
    qtbot.addWidget(view)
    view.open(run_folder)
    rows = [[view.table.item(r, c).text() for c in range(5)] for r in range(view.table.rowCount())]
    assert [r[2] for r in rows] == ["crashed", "wrong", "half", "good"]
    assert rows[0][0] == "failed" and rows[0][3] == "broken.nii is truncated"
    assert rows[1] == ["0.0", "diagnosis", "wrong", "Yes.", "no"]
    assert "1 failed" in view.summary_label.text() and "noise" in view.summary_label.text()


def test_double_click_loads_the_scan_shows_the_case_and_ask_again_hands_it_over(qtbot, run_folder):
    scene, asked = LoadingScene(), []
    view = ResultsView(scene)
    view.ask_again = lambda volume_id, case: asked.append((volume_id, case["id"], case["question"]))
    qtbot.addWidget(view)
    view.show()
    view.open(run_folder)
    assert not view.ask_button.isEnabled()
    double_click(qtbot, view, 1)
    assert scene.loaded == ["/scans/a.nii"]
    text = view.detail.text()
    assert "Question: pleural effusion" in text and "Answer: Yes." in text and "Reference: no" in text
    assert not view.thumbnail.pixmap().isNull() and view.thumbnail.pixmap().width() == 50
    qtbot.mouseClick(view.ask_button, QtCore.Qt.LeftButton)
    assert asked == [("vtkMRMLScalarVolumeNode1", "wrong", "pleural effusion")]


def test_a_scan_that_will_not_load_and_a_folder_that_is_no_run_are_said_in_the_tab(qtbot, run_folder, tmp_path_factory):
    view = ResultsView(LoadingScene())
    view.ask_again = lambda *args: None
    qtbot.addWidget(view)
    view.show()
    view.open(run_folder)
    double_click(qtbot, view, 0)
    assert "Could not load /scans/broken.nii" in view.detail.text() and not view.ask_button.isEnabled()
    view.open(tmp_path_factory.mktemp("empty"))
    assert "not an evaluation run" in view.summary_label.text() and view.table.rowCount() == 4  # the open run stays


@pytest.mark.parametrize("damage, problem", [
    ('{"cases": {"failed": 1}, "no', "not JSON: Unterminated string"),  # a torn write
    ("[1, 2]", "not a JSON object but a list"),
    ('{"cases": [1], "note": 3}', "cases, note of the wrong type"),
    ('{"cases": {"failed": "one"}}', "cases.failed of the wrong type"),
])
def test_a_damaged_summary_is_named_in_the_tab_and_the_cases_are_still_listed(qtbot, run_folder, damage, problem):
    (run_folder / "summary.json").write_text(damage)
    view = ResultsView(LoadingScene())
    qtbot.addWidget(view)
    view.open(run_folder)
    text = view.summary_label.text()
    assert [view.table.item(r, 2).text() for r in range(view.table.rowCount())] == ["crashed", "wrong", "half", "good"]
    assert "4 cases, 1 failed" in text and "\n" not in text
    assert f"{run_folder / 'summary.json'} is damaged ({problem}" in text
    assert "rerun the radfm eval command that made this run" in text and "or delete it" in text


def test_the_module_shows_results_beside_the_chat_and_asks_a_case_again_there(slicer, qtbot, tmp_path, monkeypatch):
    """In the module (on Slicer's own MRML): the Results tab loads a real scan into the scene and
    'Ask again' puts the case's question into the chat panel with its current settings."""
    import importlib

    import pydicom.data

    from RadFMModuleLib.qt_shim import QtCore

    QtCore.QSettings.setDefaultFormat(QtCore.QSettings.IniFormat)
    QtCore.QSettings.setPath(QtCore.QSettings.IniFormat, QtCore.QSettings.UserScope, str(tmp_path / "settings"))
    sys.modules.pop("RadFMModule", None)
    module = importlib.import_module("RadFMModule")
    widget = module.RadFMModuleWidget()
    qtbot.addWidget(widget.parent)
    asked = []
    monkeypatch.setattr(widget.panel, "ask", lambda task: asked.append((task, widget.panel.input.toPlainText())))
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "cases.jsonl").write_text(json.dumps(
        {"id": "ct", "task": "diagnosis", "question": "pleural effusion", "images": [ct], "reference": "no",
         "answer": "Yes.", "scores": {"accuracy": 0.0}}) + "\n")
    assert [widget.tabs.tabText(n) for n in range(widget.tabs.count())] == ["Chat", "Results"]
    widget.results.open(tmp_path / "run")
    widget.results.show_case(0)
    volume_id = widget.results.current[0]
    assert slicer.mrmlScene.GetNodeByID(volume_id).GetImageData().GetDimensions()[:2] == (128, 128)
    qtbot.mouseClick(widget.results.ask_button, QtCore.Qt.LeftButton)
    assert asked == [("diagnosis", "pleural effusion")]
    assert widget.panel.selection().volume_id == volume_id and widget.tabs.currentWidget() is widget.panel
    widget.cleanup()
