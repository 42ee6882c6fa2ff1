"""The chat panel under real Qt (PySide6, offscreen), with a scripted worker client.

The scene is plain Python (a chest CT phantom, a prior, a segment, an ROI box, a line);
every ask goes through the real RadFMSlicer input pipeline in ``ScriptedWorkerClient``,
so the requests the panel builds are the ones the worker accepts. One test runs the
panel end to end with the real worker process on the parity fixture.
"""

import json
import os
import sys
import threading
import types
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "RadFMModule"))

from RadFMModuleLib import chat_panel  # noqa: E402
from RadFMModuleLib.assistant import TASK_TOKENS, Assistant  # noqa: E402
from RadFMModuleLib.chat_panel import ChatPanel  # noqa: E402
from RadFMModuleLib.qt_shim import QtCore, QtGui, QtWidgets  # noqa: E402
from RadFMModuleLib.settings import ModelSettings  # noqa: E402
from RadFMModuleLib.turn_views import CURSOR, NOTICE, STOP_NOTES, ZERO_WIDTH_SPACE, AnswerView  # noqa: E402
from RadFMSlicer.session import Session  # noqa: E402
from panel_fit import cuts_of, unreadable_at  # noqa: E402
from panel_scene import IJK_TO_RAS, SHAPE, FakeScene, nodule_mask  # noqa: E402
from scripted_worker import CRASH, PAUSE, STOPPED_BY, Encoded, ScriptedWorkerClient, tokens  # noqa: E402


@pytest.fixture
def store(tmp_path):
    settings = QtCore.QSettings(str(tmp_path / "radfm.ini"), QtCore.QSettings.IniFormat)
    ModelSettings(checkpoint_folder=str(tmp_path / "checkpoint"), device="cpu", precision="float32").save(settings)
    return settings


@pytest.fixture
def open_panel(qtbot, store):
    """open_panel(*scripts, scene=None, load_gate=None) -> (panel, scene, clients started)."""

    def open_(*scripts, scene=None, load_gate=None):
        shared, clients = list(scripts), []

        def start(python):
            clients.append(ScriptedWorkerClient(shared, load_gate))
            return clients[-1]

        scene = scene or FakeScene()
        panel = ChatPanel(Assistant(scene, start), store)
        qtbot.addWidget(panel)  # closed (and so shut down) after the test
        panel.resize(440, 940)
        return panel, scene, clients

    return open_


def wait_idle(qtbot, panel):
    qtbot.waitUntil(lambda: not panel.busy_now, timeout=15000)


def paused(clients):
    return lambda: bool(clients and clients[-1].requests and clients[-1].requests[-1].script[:1] == [PAUSE])


def check_all_regions(panel):
    for n in range(panel.region_list.count()):
        panel.region_list.item(n).setCheckState(QtCore.Qt.Checked)


def thumbnails(view: AnswerView) -> list:
    items = (view.thumbs.itemAt(n).widget() for n in range(view.thumbs.count()))
    return [widget for widget in items if widget is not None]


# ---------------------------------------------------------------------------------- the Qt binding
def test_waiting_on_qt_events_keeps_python_alive(qtbot):
    """The panel and the module wait for answers in processEvents loops (``slicer.app.processEvents``,
    ``qtbot.waitUntil``). PySide6 6.12.0 dropped a reference to None on each call: a few thousand calls
    later Python 3.11 aborted with 'Fatal Python error: none_dealloc' mid-answer (None is immortal
    only from Python 3.12). The gui extra leaves that release out."""
    before = sys.getrefcount(None)
    for _ in range(200):
        QtWidgets.QApplication.processEvents()
    assert sys.getrefcount(None) >= before - 20  # other objects may let go of a few Nones meanwhile


# ---------------------------------------------------------------------------------- asking
def test_ask_button_streams_the_answer_token_by_token(open_panel, qtbot, monkeypatch):
    answer = "No pleural effusion. The lungs are clear."
    panel, scene, clients = open_panel(tokens(answer))
    clock = iter(range(1000))  # the panel's clock: one second more at each reading, however fast the machine
    monkeypatch.setattr(chat_panel, "time", types.SimpleNamespace(monotonic=lambda: float(next(clock))))
    shown = []
    append = AnswerView.append
    monkeypatch.setattr(AnswerView, "append", lambda view, delta: (
        append(view, delta), shown.append((view.body.text(), panel.status_label.text()))))

    panel.input.setPlainText("Is there a pleural effusion?")
    qtbot.mouseClick(panel.ask_button, QtCore.Qt.LeftButton)
    assert panel.busy_now and panel.stop_button.isEnabled() and not panel.ask_button.isEnabled()
    wait_idle(qtbot, panel)

    parts = tokens(answer)
    assert [text for text, _ in shown] == ["".join(parts[: n + 1]) + CURSOR for n in range(len(parts))]
    # the status as the last token arrives: k tokens read, the k-th k seconds after the first
    k = len(parts) - 1
    assert shown[-1][1] == f"Writing\u2026 {k} tokens, {(k - 1) / k:.1f} tokens/s"
    view = panel.answers[-1]
    assert view.body.text() == answer and panel.status_label.text() == "Answer complete."
    assert panel.input.toPlainText() == "" and panel.ask_button.isEnabled() and not panel.stop_button.isEnabled()

    sent = clients[0].asks[0]
    assert (sent["task"], sent["question"], sent["window"], sent["regions"]) == ("vqa", "Is there a pleural effusion?",
                                                                                None, [])
    image = sent["images"][0]
    assert image["role"] == "current" and image["window"] == "-600.0,1500.0"  # the viewer's window/level
    np.testing.assert_array_equal(np.load(image["array"]), scene.arrays["ct"])
    np.testing.assert_allclose(image["ijk_to_ras"], IJK_TO_RAS)

    turn = panel.assistant.session.turns[0]
    assert turn.images[0].window["center"] == -600 and len(thumbnails(view)) == 1
    assert "Image 1: CT chest 2024-03-01 (current)" in view.details.text() and not view.details.isVisible()
    assert any(label.text() == NOTICE for label in view.frame.findChildren(QtWidgets.QLabel))
    assert json.loads(scene.saved)["turns"][0]["answer"] == answer  # saved in the scene


def test_enter_sends_and_shift_enter_starts_a_new_line(open_panel, qtbot):
    panel, scene, clients = open_panel(tokens("Yes."))
    qtbot.keyClicks(panel.input, "Any nodule")
    qtbot.keyClick(panel.input, QtCore.Qt.Key_Return, QtCore.Qt.ShiftModifier)
    qtbot.keyClicks(panel.input, "in the right lung?")
    assert not panel.busy_now and panel.input.toPlainText() == "Any nodule\nin the right lung?"
    qtbot.keyClick(panel.input, QtCore.Qt.Key_Return)
    wait_idle(qtbot, panel)
    assert clients[0].asks[0]["question"] == "Any nodule\nin the right lung?"
    assert panel.answers[-1].body.text() == "Yes."


def draft_report_on_everything(panel, qtbot, history):
    """Draft report on the scan, the prior and every region, lung window, with ``history``."""
    panel.prior_box.setCurrentIndex(panel.prior_box.findData("prior"))
    panel.window_box.setCurrentIndex(panel.window_box.findData("lung"))
    panel.history_edit.setText(history)
    check_all_regions(panel)
    qtbot.mouseClick(panel.task_buttons[0], QtCore.Qt.LeftButton)  # Draft report
    wait_idle(qtbot, panel)


def test_an_answer_cut_short_by_the_full_context_says_so_apart_from_the_length_limit(open_panel, qtbot):
    panel, scene, clients = open_panel(tokens("Findings: a nodule") + [STOPPED_BY, "context"],
                                       tokens("Findings: a nodule") + [STOPPED_BY, "length"])
    statuses = []
    for question in ("Describe", "Describe again"):
        panel.input.setPlainText(question)
        qtbot.keyClick(panel.input, QtCore.Qt.Key_Return)
        wait_idle(qtbot, panel)
        statuses.append(panel.status_label.full_text)
    assert [answer.state.text() for answer in panel.answers] == ["context full", "length limit"]
    assert statuses == [STOP_NOTES["context"], "Stopped at the length limit."]
    assert "context is full" in statuses[0]


def test_draft_report_sends_prior_regions_window_and_history(open_panel, qtbot):
    panel, scene, clients = open_panel(tokens("Findings: a right upper lobe nodule."))
    draft_report_on_everything(panel, qtbot, "67 y, male, former smoker")

    sent = clients[0].asks[0]
    assert sent["task"] == "report" and sent["window"] == "lung"
    assert [(i["role"], i["name"], i["window"]) for i in sent["images"]] == [
        ("current", "CT chest 2024-03-01", None), ("prior", "CT chest 2023-09-12", None)]
    mask, box = sent["regions"]
    np.testing.assert_array_equal(np.load(mask["mask"]), nodule_mask())
    assert (mask["name"], mask["image"], box["name"], box["box_ras"]) == ("Lesion RUL", 0, "ROI 1",
                                                                          scene.box_ras("roi1"))
    assert sent["history"] == "67 y, male, former smoker; Measured: Line 1 23.4 mm"
    turn = panel.assistant.session.turns[0]
    assert [image.role for image in turn.images] == ["current", "prior", "region", "region"]
    assert len(thumbnails(panel.answers[-1])) == 4


def test_asking_without_a_question_or_checkpoint_explains_what_is_missing(open_panel, qtbot):
    panel, scene, clients = open_panel()
    panel.ask("vqa")
    assert not panel.busy_now and panel.status_label.text() == "Type a question first."
    panel.folder_edit.setText("")
    panel.input.setPlainText("Any effusion?")
    panel.ask("vqa")
    assert not panel.busy_now and "checkpoint folder" in panel.status_label.text()
    assert clients == [] and panel.answers == []


# ---------------------------------------------------------------------------------- stopping
def test_stop_cancels_and_keeps_the_words_so_far(open_panel, qtbot):
    panel, scene, clients = open_panel(tokens("The lungs are") + [PAUSE] + tokens(" clear."))
    panel.input.setPlainText("Describe the lungs.")
    panel.ask("vqa")
    qtbot.waitUntil(paused(clients))
    qtbot.mouseClick(panel.stop_button, QtCore.Qt.LeftButton)
    wait_idle(qtbot, panel)
    assert clients[0].requests[0].cancelled
    view = panel.answers[-1]
    assert view.body.text() == "The lungs are" and view.state.text() == "stopped"
    assert panel.assistant.session.turns[-1].stop_reason == "cancelled"
    assert panel.ask_button.isEnabled() and not panel.stop_button.isEnabled()


def test_stop_while_the_model_loads_then_ask_again(open_panel, qtbot):
    gate = threading.Event()
    panel, scene, clients = open_panel(tokens("Clear."), load_gate=gate)
    panel.input.setPlainText("Any effusion?")
    panel.ask("vqa")
    qtbot.waitUntil(lambda: "Loading the model" in panel.status_label.text())
    panel.stop()
    assert not panel.busy_now and panel.assistant.session.turns[-1].stop_reason == "cancelled"
    gate.set()
    panel.input.setPlainText("Any effusion?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    assert len(clients) == 1 and panel.answers[-1].body.text() == "Clear."  # the same worker, loaded once


def test_closing_mid_answer_cancels_and_stops_the_worker(open_panel, qtbot):
    panel, scene, clients = open_panel(tokens("The lungs") + [PAUSE])
    panel.input.setPlainText("Describe the lungs.")
    panel.ask("vqa")
    qtbot.waitUntil(paused(clients))
    files = panel.assistant._files
    panel.close()
    assert clients[0].requests[0].cancelled and clients[0].closed
    assert not os.path.exists(files) and not panel.busy_now


def choose_scan(panel, volume_id):
    panel.volume_box.setCurrentIndex(panel.volume_box.findData(volume_id))


def test_a_scan_chosen_while_the_model_runs_is_prepared_before_the_question(open_panel, qtbot):
    panel, scene, clients = open_panel(tokens("No nodule."), tokens("A nodule."))
    choose_scan(panel, "prior")
    qtbot.wait(2 * chat_panel.AHEAD_MS)
    assert clients == []  # no model yet: choosing a scan starts nothing (the first question does)
    choose_scan(panel, "ct")
    panel.input.setPlainText("Any nodule?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    qtbot.wait(2 * chat_panel.AHEAD_MS)
    assert clients[0].encodes == []  # the question just sent this scan

    choose_scan(panel, "prior")  # the radiologist moves on to the prior and starts typing
    qtbot.waitUntil(lambda: len(clients[0].encodes) == 1)
    (ahead,) = clients[0].encodes[0]["images"]
    assert ahead["role"] == "current" and np.array_equal(np.load(ahead["array"]), scene.arrays["prior"])
    qtbot.waitUntil(lambda: "prepared ahead of the question" in panel.log_view.toPlainText())
    panel.input.setPlainText("Any nodule?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    assert clients[0].asks[-1]["images"] == [ahead]  # the same file: nothing handed over twice
    qtbot.wait(2 * chat_panel.AHEAD_MS)
    assert len(clients[0].encodes) == 1


def test_a_scan_that_cannot_be_prepared_ahead_is_logged_and_the_question_says_why(open_panel, qtbot):
    panel, scene, clients = open_panel(tokens("No nodule."))
    panel.input.setPlainText("Any nodule?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    scene.arrays["prior"] = np.zeros(SHAPE, dtype=np.int16)  # nothing to see: the pipeline refuses it
    choose_scan(panel, "prior")
    qtbot.waitUntil(lambda: "ahead of the question failed" in panel.log_view.toPlainText())
    assert "same value" in panel.log_view.toPlainText() and panel.status_label.text() == "Answer complete."
    panel.input.setPlainText("Any nodule?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    assert "same value" in panel.answers[-1].frame.findChild(QtWidgets.QLabel, "error").text()


def test_a_worker_that_dies_while_preparing_ahead_is_logged_and_the_next_question_restarts_it(open_panel, qtbot):
    panel, scene, clients = open_panel(tokens("No nodule."), tokens("A nodule."))
    panel.input.setPlainText("Any nodule?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)

    def dies(images, window=None):
        clients[0].crashed = True
        return Encoded(CRASH)

    clients[0].encode = dies
    choose_scan(panel, "prior")
    qtbot.waitUntil(lambda: "ahead of the question failed" in panel.log_view.toPlainText())
    assert "killed by SIGKILL" in panel.log_view.toPlainText() and not panel.busy_now
    panel.input.setPlainText("Any nodule?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    assert len(clients) == 2 and panel.answers[-1].body.text() == "A nodule."  # a fresh worker answered
    assert [turn.answer for turn in panel.assistant.session.turns] == ["No nodule.", "A nodule."]


# ---------------------------------------------------------------------------------- failures
def test_worker_crash_is_shown_and_the_conversation_kept(open_panel, qtbot):
    panel, scene, clients = open_panel(tokens("No effusion."), tokens("The") + [CRASH], tokens("Clear lungs."))
    for question in ("Any effusion?", "Describe the lungs."):
        panel.input.setPlainText(question)
        panel.ask("vqa")
        wait_idle(qtbot, panel)

    error = panel.answers[-1].frame.findChild(QtWidgets.QLabel, "error")
    assert "killed by SIGKILL" in error.text() and panel.answers[-1].body.text() == "The"
    assert "conversation is kept" in panel.status_label.text()
    assert panel.answers[0].body.text() == "No effusion."  # the earlier answer is still there
    assert [t.error is None for t in panel.assistant.session.turns] == [True, False]

    panel.input.setPlainText("Describe the lungs.")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    assert len(clients) == 2 and clients[0].closed  # a fresh worker replaced the dead one
    assert panel.answers[-1].body.text() == "Clear lungs." and len(json.loads(scene.saved)["turns"]) == 3


def test_a_request_the_worker_rejects_is_reported_in_the_conversation(open_panel, qtbot):
    panel, scene, clients = open_panel()
    scene.arrays["ct"] = np.zeros(SHAPE, dtype=np.int16)  # nothing to see: the pipeline refuses it
    panel.input.setPlainText("Any effusion?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    assert "same value" in panel.answers[-1].frame.findChild(QtWidgets.QLabel, "error").text()


# ---------------------------------------------------------------------------------- keeping it
def test_conversation_is_restored_from_the_scene(open_panel, qtbot):
    panel, scene, clients = open_panel(tokens("No effusion."))
    panel.input.setPlainText("Any effusion?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    reopened, _, _ = open_panel(scene=scene)
    assert [view.body.text() for view in reopened.answers] == ["No effusion."]
    assert not reopened.empty_label.isVisible() and len(thumbnails(reopened.answers[0])) == 1


def test_export_markdown_and_json(open_panel, qtbot, tmp_path, monkeypatch):
    panel, scene, clients = open_panel(tokens("No pleural effusion."))
    panel.input.setPlainText("Is there a pleural effusion?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    markdown, as_json = tmp_path / "talk.md", tmp_path / "talk.json"
    panel.export(str(markdown), "md")
    monkeypatch.setattr(chat_panel, "ask_save_path", lambda *args: str(as_json))
    panel.export_button.menu().actions()[1].trigger()  # "As JSON...", through the file dialog
    text = markdown.read_text()
    assert "Is there a pleural effusion?" in text and "No pleural effusion." in text and "Research use only" in text
    assert Session.from_json(as_json.read_text()).turns[0].answer == "No pleural effusion."
    panel.copy_answer()
    assert QtWidgets.QApplication.clipboard().text() == "No pleural effusion."


def test_model_settings_are_remembered_across_panels(qtbot, store):
    panel = ChatPanel(Assistant(FakeScene()), store)
    qtbot.addWidget(panel)
    panel.folder_edit.setText("/models/RadFM")
    panel.device_box.setCurrentText("cuda")
    panel.precision_box.setCurrentText("int8 weights")
    panel.python_edit.setText("/opt/radfm/bin/python")
    panel.close()

    reopened = ChatPanel(Assistant(FakeScene()), QtCore.QSettings(store.fileName(), QtCore.QSettings.IniFormat))
    qtbot.addWidget(reopened)
    assert (reopened.folder_edit.text(), reopened.device_box.currentText(), reopened.precision_box.currentText(),
            reopened.python_edit.text()) == ("/models/RadFM", "cuda", "int8 weights", "/opt/radfm/bin/python")
    settings = reopened.assistant.settings
    assert settings.load_args() == {"device": "cuda", "dtype": "bfloat16", "quantization": "int8"}


@pytest.fixture
def main_window(qtbot):
    """Stands for Slicer's main window; held by the fixture so it outlives the panel inside it."""
    window = QtWidgets.QMainWindow()
    qtbot.addWidget(window)
    return window


def test_typing_does_not_fire_single_key_viewer_shortcuts(open_panel, qtbot, main_window):
    panel, scene, clients = open_panel()
    window = main_window
    window.setCentralWidget(panel)
    fired = []
    for key in ("a", "Space", "Delete"):  # Slicer-style single-key shortcuts on the main window
        QtGui.QShortcut(QtGui.QKeySequence(key), window).activated.connect(lambda key=key: fired.append(key))
    window.show()
    window.activateWindow()
    qtbot.waitUntil(lambda: QtWidgets.QApplication.activeWindow() is window)  # shortcuts need an active window

    panel.ask_button.setFocus()
    qtbot.keyClick(panel.ask_button, QtCore.Qt.Key_A)
    assert fired == ["a"]  # the shortcut is live when no text box has the focus

    for box in (panel.input, panel.history_edit):
        box.setFocus()
        qtbot.keyClicks(box, "a a")
        qtbot.keyClick(box, QtCore.Qt.Key_Delete)
    assert fired == ["a"]
    assert panel.input.toPlainText() == "a a" and panel.history_edit.text() == "a a"


# ---------------------------------------------------------------------------------- Slicer's PythonQt
def python_event_filters(panel) -> list:
    return [obj for obj in panel.findChildren(QtCore.QObject) if type(obj).eventFilter is not QtCore.QObject.eventFilter]


def test_event_filters_take_a_shortcut_override_as_pythonqt_hands_it_over(open_panel, qtbot):
    """PythonQt converts only KeyPress/KeyRelease to QKeyEvent: ShortcutOverride reaches Python as a plain QEvent."""
    panel, scene, clients = open_panel(tokens("Yes."))
    filters = python_event_filters(panel)
    assert filters
    for kind in (QtCore.QEvent.ShortcutOverride, QtCore.QEvent.FocusIn, QtCore.QEvent.Paint):
        for watcher in filters:
            assert watcher.eventFilter(panel.input, QtCore.QEvent(kind)) is False  # not consumed, and no raise
    qtbot.keyClicks(panel.input, "Any effusion?")
    qtbot.keyClick(panel.input, QtCore.Qt.Key_Return)
    wait_idle(qtbot, panel)
    assert clients[0].asks[0]["question"] == "Any effusion?"


def test_closing_needs_no_python_visible_base_close_event(open_panel, qtbot, monkeypatch):
    """Under PythonQt super().closeEvent raises AttributeError; here the base method is hidden the same way."""
    panel, scene, clients = open_panel(tokens("The lungs") + [PAUSE])
    panel.input.setPlainText("Describe the lungs.")
    panel.ask("vqa")
    qtbot.waitUntil(paused(clients))
    monkeypatch.delattr(QtWidgets.QWidget, "closeEvent")
    panel.close()
    assert clients[0].closed and not panel.busy_now and not panel.isVisible()


def test_a_turn_that_cannot_be_recorded_leaves_the_panel_usable(open_panel, qtbot, monkeypatch):
    """Recording imported SimpleITK in a Slicer without it: the panel stayed busy forever."""
    panel, scene, clients = open_panel(tokens("No effusion."), tokens("Clear."))
    record = panel.assistant.record
    monkeypatch.setattr(panel.assistant, "record", lambda turn: (_ for _ in ()).throw(
        ImportError("No module named 'SimpleITK'")))
    panel.input.setPlainText("Any effusion?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    view = panel.answers[-1]
    assert "could not be recorded" in view.frame.findChild(QtWidgets.QLabel, "error").text()
    assert view.body.text() == "No effusion." and "see the log" in panel.status_label.text()
    assert "SimpleITK" in panel.log_view.toPlainText()
    assert panel.ask_button.isEnabled() and not panel.stop_button.isEnabled()
    monkeypatch.setattr(panel.assistant, "record", record)
    panel.input.setPlainText("Any effusion?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    assert panel.answers[-1].body.text() == "Clear."


def test_the_panel_moves_through_explicit_states(open_panel, qtbot, monkeypatch):
    panel, scene, clients = open_panel(tokens("The lungs are") + [PAUSE] + tokens(" clear."))
    seen = []
    set_state = panel._set_state
    monkeypatch.setattr(panel, "_set_state", lambda state: (seen.append(state), set_state(state)))
    panel.input.setPlainText("Describe the lungs.")
    panel.ask("vqa")
    assert panel.state == chat_panel.CONNECTING and panel.stop_button.isEnabled()
    qtbot.waitUntil(paused(clients))
    assert panel.state == chat_panel.GENERATING
    panel.stop()
    assert panel.state == chat_panel.STOPPING and not panel.stop_button.isEnabled() and not panel.ask_button.isEnabled()
    wait_idle(qtbot, panel)
    assert seen == [chat_panel.CONNECTING, chat_panel.GENERATING, chat_panel.STOPPING, chat_panel.IDLE]


def test_log_pane_shows_worker_messages_and_install_output(open_panel, qtbot):
    panel, scene, clients = open_panel(tokens("Clear.") + [PAUSE])
    assert not panel.log_section.body.isVisible()  # folded away until opened
    panel.log("Installing RadFM's Python packages\u2026\nSuccessfully installed numpy")
    panel.input.setPlainText("Any effusion?")
    panel.ask("vqa")
    qtbot.waitUntil(paused(clients))
    threading.Thread(target=clients[0].on_stderr, args=("Loading checkpoint shards: 100%",)).start()
    qtbot.waitUntil(lambda: "Loading checkpoint shards: 100%" in panel.log_view.toPlainText())
    lines = panel.log_view.toPlainText().splitlines()
    assert lines[:2] == ["Installing RadFM's Python packages\u2026", "Successfully installed numpy"]
    assert lines.index("Loading the model on cpu (float32); this can take a few minutes\u2026") > 1
    panel.log_section.toggle.click()
    assert panel.log_section.body.isVisible() == panel.isVisible()


# ---------------------------------------------------------------------------------- the real worker
# Loaded by the worker's Python at start-up: a worker Python chosen in Slicer may lack psutil, so the worker
# must start and answer without it.
WITHOUT_PSUTIL = """
import sys
from importlib.machinery import PathFinder

class WithoutPsutil(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] == "psutil" else super().find_spec(name, path, target)

sys.meta_path[sys.meta_path.index(PathFinder)] = WithoutPsutil
"""


def test_real_worker_streams_an_answer_and_stops_on_request(qtbot, store, fixture_dir, monkeypatch, tmp_path):
    """The panel as shipped: Assistant's default client, a worker process loading the parity fixture on CPU."""
    (tmp_path / "sitecustomize.py").write_text(WITHOUT_PSUTIL)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path), prepend=os.pathsep)
    scene = FakeScene()
    panel = ChatPanel(Assistant(scene), store)
    qtbot.addWidget(panel)
    panel.folder_edit.setText(str(fixture_dir))  # as the user types it in Model settings
    panel.volume_box.setCurrentIndex(panel.volume_box.findData("prior"))  # not the volume shown in the viewer
    statuses = []
    set_status = panel._set_status
    monkeypatch.setattr(panel, "_set_status", lambda text: (statuses.append(text), set_status(text)))

    qtbot.mouseClick(panel.task_buttons[2], QtCore.Qt.LeftButton)  # Modality: 32 new tokens at most
    qtbot.waitUntil(lambda: not panel.busy_now, timeout=120_000)
    view, turn = panel.answers[-1], panel.assistant.session.turns[-1]
    assert turn.error is None and turn.stop_reason in ("eos", "length"), turn.error
    assert view.body.text() == turn.answer != "" and Session.from_json(scene.saved).turns[-1].answer == turn.answer
    loading = next(n for n, text in enumerate(statuses) if text.startswith("Loading the model on cpu (float32)"))
    writing = next(n for n, text in enumerate(statuses) if text.startswith("Writing\u2026"))
    assert statuses[0] == "Starting the model worker\u2026" and loading < statuses.index("Generating\u2026") < writing
    assert statuses[-1] == STOP_NOTES.get(turn.stop_reason, "Answer complete.") == panel.status_label.text()
    assert "Image 1: CT chest 2023-09-12 (current)" in view.details.text() and str(fixture_dir) in view.details.text()
    assert len(thumbnails(view)) == 1 and view.details_button.isEnabled()

    monkeypatch.setitem(TASK_TOKENS, "report", 1500)  # a long answer, to stop midway
    del statuses[:]
    qtbot.mouseClick(panel.task_buttons[0], QtCore.Qt.LeftButton)  # Draft report
    qtbot.waitUntil(lambda: bool(panel._answer.text.strip()), timeout=120_000)
    shown = panel._answer.text
    qtbot.mouseClick(panel.stop_button, QtCore.Qt.LeftButton)
    qtbot.waitUntil(lambda: not panel.busy_now, timeout=120_000)
    view, turn = panel.answers[-1], panel.assistant.session.turns[-1]
    assert turn.stop_reason == "cancelled" and turn.provenance["timing"]["new_tokens"] < 1500
    assert view.body.text() == turn.answer == Session.from_json(scene.saved).turns[-1].answer
    assert turn.answer.startswith(shown) and view.state.text() == "stopped"
    assert statuses[statuses.index("Stopping\u2026") + 1:] == ["Stopped before the end."]  # no "Writing…" after Stop
    assert not any(text.startswith(("Starting", "Loading")) for text in statuses)  # the loaded worker was reused

    worker = panel.assistant.client.proc
    panel.close()
    assert worker.poll() is not None  # no worker process left behind


# ---------------------------------------------------------------------------------- screenshot
def test_screenshot_mid_conversation(open_panel, qtbot, tmp_path):
    """The panel as a radiologist sees it: one answer with its region, a report being written."""
    report = ("Findings: A 9 mm solid nodule in the right upper lobe, with smooth margins. No consolidation. "
              "No pleural effusion. Heart size is normal. No mediastinal lymphadenopathy.\n"
              "Impression: Solitary right upper lobe nodule; compare with prior imaging and consider follow-up CT.")
    cut = report.index("No pleural")
    panel, scene, clients = open_panel(tokens("Yes. There is a solid nodule in the right upper lobe; it has "
                                              "smooth margins and no cavitation."),
                                       tokens(report[:cut]) + [PAUSE] + tokens(report[cut:]))
    panel.history_edit.setText("67 y, male, former smoker, cough for 3 weeks")
    panel.window_box.setCurrentIndex(panel.window_box.findData("lung"))
    panel.region_list.item(0).setCheckState(QtCore.Qt.Checked)
    panel.input.setPlainText("Is the marked lesion a solid nodule?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    panel.region_list.item(0).setCheckState(QtCore.Qt.Unchecked)
    qtbot.mouseClick(panel.task_buttons[0], QtCore.Qt.LeftButton)
    qtbot.waitUntil(paused(clients))
    qtbot.wait(3 * chat_panel.TICK_MS)
    panel.show()
    qtbot.waitExposed(panel)
    shot = tmp_path / "panel.png"  # the README's picture, the panel beside Slicer's views: test_slicer_host
    assert panel.grab().save(str(shot)) and shot.stat().st_size > 10_000
    assert panel.busy_now and len(thumbnails(panel.answers[0])) == 2


# ---------------------------------------------------------------------------------- fitting Slicer's side panel
SIDE_PANEL_WIDTHS = (400, 420, 440)


@pytest.fixture(params=[None, 12], ids=["default font", "12 pt font"])
def app_font(request, qapp):
    """The application font the panel is built with: this PySide6's own, or the 12 pt that Qt 5 (and so
    PythonQt, and Slicer on Linux) uses, where the panel's texts are a third wider."""
    kept = QtGui.QFont(qapp.font())
    if request.param:
        font = QtGui.QFont(kept)
        font.setPointSizeF(request.param)
        qapp.setFont(font)
    yield request.param
    qapp.setFont(kept)


def show_at(panel, qtbot, width):
    panel.show()
    qtbot.waitExposed(panel)
    return unreadable_at(panel, width)


def test_every_text_reads_in_full_at_side_panel_widths(open_panel, qtbot, tmp_path, app_font):
    """A report on scan, prior and two regions, exported: at 400-440 px every label, the question's
    context, the thumbnails' captions, each button and the status are drawn whole (none cut at the
    right edge, none squeezed), and the panel is no wider than asked."""
    panel, scene, clients = open_panel(tokens("Findings: a right upper lobe nodule."))
    draft_report_on_everything(panel, qtbot, "67 y, male, former smoker, cough for 3 weeks")
    panel.export(str(tmp_path / "talk.json"), "json")
    panel.answers[-1].details_button.click()  # What the model saw
    panel.settings_section.toggle.click()
    panel.log_section.toggle.click()
    assert panel.status_label.text() == "Conversation saved as talk.json"
    context = panel.turns_layout.itemAt(1).widget().findChildren(QtWidgets.QLabel, "muted")[0]
    assert "Lesion RUL (segment)" in context.text() and "history: 67 y" in context.text()
    assert len(thumbnails(panel.answers[-1])) == 4
    cut = {width: show_at(panel, qtbot, width) for width in SIDE_PANEL_WIDTHS}
    assert cut == {width: [] for width in SIDE_PANEL_WIDTHS}


def test_a_long_status_wraps_below_the_buttons_instead_of_being_cut(open_panel, qtbot, app_font):
    """What failed and what to do next, in full: the crash status is longer than a side panel is wide."""
    panel, scene, clients = open_panel(tokens("The") + [CRASH])
    panel.input.setPlainText("Describe the lungs.")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    status = "The model could not answer; the conversation is kept. Ask again to restart the worker."
    assert panel.status_label.text() == status
    for width in SIDE_PANEL_WIDTHS:
        show_at(panel, qtbot, width)
        assert cuts_of(panel.status_label, panel) == []
        top, bottom = panel.status_label.geometry(), panel.export_button.geometry()
        assert top.width() >= panel.width() - 8 and not top.intersects(bottom)  # its own row, nothing over it


def test_a_file_name_or_path_longer_than_the_panel_wraps_instead_of_running_out(open_panel, qtbot, tmp_path,
                                                                               app_font):
    """Qt wraps only where Unicode allows a break, and a Windows path or a long file name has none: the
    status naming the export and the checkpoint in What the model saw ran out of the panel, cut at its edge."""
    folder = "C:\\Users\\radiologist\\Documents\\RadFM\\checkpoints\\RadFM_fp32"  # as Slicer on Windows shows it
    name = "RadFM_conversation_CT_chest_20240301_follow_up_patient_1234567.json"
    panel, scene, clients = open_panel(tokens("No effusion."))
    panel.folder_edit.setText(folder)
    panel.input.setPlainText("Any effusion?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    panel.export(str(tmp_path / name), "json")
    view = panel.answers[-1]
    view.details_button.click()
    for width in SIDE_PANEL_WIDTHS:
        assert show_at(panel, qtbot, width) == []  # a word the label cannot break also widens the panel
        assert panel.status_label.text().replace(ZERO_WIDTH_SPACE, "") == f"Conversation saved as {name}"
        assert f"checkpoint {folder}," in view.details.text().replace(ZERO_WIDTH_SPACE, "")
    assert panel.status_label.toolTip() == str(tmp_path / name)


def test_a_long_series_name_keeps_the_panel_to_its_width_and_is_named_in_full(open_panel, qtbot, app_font):
    """A scan box as wide as its longest name made the panel (and every text in it) wider than Slicer's
    side panel; now a long name is shown as far as the box goes, and whole in its tooltip."""
    scene = FakeScene()
    long_name = "1.2.840.113619.2.55.3.604688119.971: CT CHEST W/O CONTRAST 1.25MM LUNG KERNEL"
    scene.NAMES = {**scene.NAMES, "ct": long_name}
    panel, scene, clients = open_panel(scene=scene)
    panel.prior_box.setCurrentIndex(panel.prior_box.findData("ct"))
    assert {width: show_at(panel, qtbot, width) for width in SIDE_PANEL_WIDTHS} == {w: [] for w in SIDE_PANEL_WIDTHS}
    assert panel.volume_box.toolTip() == panel.prior_box.toolTip() == long_name
    assert panel.region_list.item(0).toolTip() == "Lesion RUL (segment)"


def test_the_busy_bar_and_the_gpu_offer_fit_beside_export(open_panel, qtbot, app_font):
    """The row under the status also holds, at times, the busy bar and the offer of a precision that fits."""
    from RadFMSlicer.errors import DeviceMemoryError
    from RadFMSlicer.worker.client import WorkerError

    panel, scene, clients = open_panel(tokens("A solid") + [PAUSE] + tokens(" nodule."))
    panel.input.setPlainText("Is the marked lesion a solid nodule?")
    panel.ask("vqa")
    qtbot.waitUntil(paused(clients))
    qtbot.wait(3 * chat_panel.TICK_MS)
    assert panel.busy.isVisibleTo(panel) and panel.status_label.text().startswith("Writing\u2026")
    assert {width: show_at(panel, qtbot, width) for width in SIDE_PANEL_WIDTHS} == {w: [] for w in SIDE_PANEL_WIDTHS}
    panel.stop()
    wait_idle(qtbot, panel)

    class TooBig(ScriptedWorkerClient):
        def load(self, folder, **kwargs):
            raise WorkerError(f"bfloat16 needs ~27 GiB, 16 GiB free; {DeviceMemoryError.FITS}int8 (~14 GiB)")

    panel.assistant.start_client = lambda python: TooBig([])
    panel.precision_box.setCurrentText("bfloat16")  # the next question loads anew, and the GPU is too small
    panel.input.setPlainText("Is the marked lesion a solid nodule?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    assert panel.offer_button.isVisibleTo(panel) and panel.offer_button.text() == "Use int8 weights"
    assert {width: show_at(panel, qtbot, width) for width in SIDE_PANEL_WIDTHS} == {w: [] for w in SIDE_PANEL_WIDTHS}


def rows_of(widgets) -> int:
    """How many rows the widgets are drawn in (one starts below the bottom of the last)."""
    bottoms = []
    for widget in sorted(widgets, key=lambda w: w.y()):
        if not bottoms or widget.y() >= bottoms[-1]:
            bottoms.append(widget.y() + widget.height())
        bottoms[-1] = max(bottoms[-1], widget.y() + widget.height())
    return len(bottoms)


def test_thumbnails_take_as_many_rows_as_the_width_needs_and_name_their_image(open_panel, qtbot, app_font):
    panel, scene, clients = open_panel(tokens("Findings: a right upper lobe nodule."))
    draft_report_on_everything(panel, qtbot, "")
    view, turn = panel.answers[-1], panel.assistant.session.turns[-1]
    rows = {}
    for width in (800, *SIDE_PANEL_WIDTHS):
        assert show_at(panel, qtbot, width) == []
        rows[width] = rows_of(thumbnails(view))
    assert rows[800] == 1 and all(1 < rows[width] < 4 for width in SIDE_PANEL_WIDTHS)  # side by side while room
    for button, image in zip(thumbnails(view), turn.images):
        role, *caption = button.text().split("\n")
        assert (role, " ".join(caption)) == (image.role, image.label)  # the name wraps, whole, under the picture
        assert button.toolTip().startswith(f"{image.label} ({image.role})")


def test_run_on_server_keeps_the_token_out_of_settings_and_never_shows_it(qtbot, store, monkeypatch):
    kept = {}
    monkeypatch.setattr(chat_panel, "save_token", lambda url, token: kept.update({url: token}) is None)
    panel = ChatPanel(Assistant(FakeScene()), store)
    qtbot.addWidget(panel)
    panel.run_on_box.setCurrentText("server")
    panel.server_edit.setText("https://rad-server:8765")
    panel.token_edit.setText("reading-room-token-0123456789")
    panel.token_edit.editingFinished.emit()
    assert kept == {"https://rad-server:8765": "reading-room-token-0123456789"}
    assert panel.token_edit.text() == "" and "keyring" in panel.token_edit.placeholderText()
    assert panel.token_edit.echoMode() == QtWidgets.QLineEdit.Password
    panel.close()
    store.sync()
    assert "reading-room-token" not in Path(store.fileName()).read_text()
    reopened = ChatPanel(Assistant(FakeScene()), QtCore.QSettings(store.fileName(), QtCore.QSettings.IniFormat))
    qtbot.addWidget(reopened)
    assert (reopened.run_on_box.currentText(), reopened.server_edit.text(), reopened.token_edit.text()) == (
        "server", "https://rad-server:8765", "")
    assert reopened.assistant.settings.run_on == "server"


def test_show_where_the_model_looked_sends_attention_and_shows_the_map_over_the_scan(open_panel, qtbot):
    panel, scene, clients = open_panel(tokens("No nodule."), tokens("No effusion."))
    assert not panel.attention_box.isChecked()  # off by default: nothing extra computed
    panel.input.setPlainText("Any effusion?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    assert "attention" not in clients[0].asks[0] and not panel.answers[-1].attention_button.isVisibleTo(panel)

    panel.attention_box.setChecked(True)
    panel.input.setPlainText("Any nodule?")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    assert clients[0].asks[1]["attention"] is True
    view = panel.answers[-1]
    assert view.attention_button.isVisibleTo(panel)
    qtbot.mouseClick(view.attention_button, QtCore.Qt.LeftButton)
    heat, name = scene.overlays["ct"]
    assert heat.shape == SHAPE and heat.max() == 1.0 and heat.mean() < 0.5  # on the scan's own grid, one peak
    assert name == "CT chest 2024-03-01 \u2014 resampler attention, not an explanation"

    os.remove(panel.assistant.session.turns[-1].provenance["attention"]["file"])  # e.g. after Slicer restarted
    qtbot.mouseClick(view.attention_button, QtCore.Qt.LeftButton)
    assert "attention map is gone" in panel.status_label.text()


def test_where_the_model_looked_with_a_server_says_it_needs_the_model_here(open_panel, qtbot):
    panel, scene, clients = open_panel(tokens("No."))
    panel.run_on_box.setCurrentText("server")
    panel.server_edit.setText("https://rad-server:8765")
    panel.attention_box.setChecked(True)
    panel.input.setPlainText("Any nodule?")
    panel.ask("vqa")
    assert not panel.busy_now and clients == []  # refused before anything starts: a server writes no map here
    assert "needs the model on this computer" in panel.status_label.text()


def test_a_question_holding_an_image_tag_is_refused_by_name_and_never_sent_to_the_model(open_panel, qtbot):
    """The panel asks through the worker, which refuses typed image tags before any model work."""
    panel, scene, clients = open_panel(tokens("Never."))
    panel.input.setPlainText("Compare <image> with the prior")
    panel.ask("vqa")
    wait_idle(qtbot, panel)
    assert panel.status_label.text().startswith("The question contains '<image>', one of the model's own image tags")
    assert clients[0].requests[-1].prepared is None and "Never." not in panel.answers[-1].body.text()
