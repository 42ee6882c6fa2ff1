"""The chat panel driven as a radiologist would, in whichever Qt binding this Python has.

Runs inside real PythonQt (the binding Slicer uses, with its flat ``qt`` module) from
``test_pythonqt_panel.py`` and under PySide6 from ``test_panel.py``. Either way torch,
transformers and SimpleITK are blocked, as in a Slicer whose Python has none of them:
the model runs in a worker process of another Python (WORKER_PYTHON) on FIXTURE_DIR.

Keys are sent as Qt delivers them (ShortcutOverride, KeyPress, KeyRelease per
character; PythonQt hands the first to Python as a plain QEvent), then Enter, the
streamed answer, Stop in the middle of a report, export, every text read in full at
Slicer's side-panel widths (``panel_fit``), and a restore in a new panel.

usage: panel_smoke.py WORKER_PYTHON FIXTURE_DIR OUT_DIR
Prints one line per step; exits with status 1 and the reason at the first failure.
"""

import os
import sys
import time

BLOCKED = ("torch", "transformers", "SimpleITK")
for _name in BLOCKED:
    sys.modules[_name] = None  # any import of them now raises ImportError

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(PROJECT, "RadFMModule"), PROJECT]

from panel_fit import unreadable_at  # noqa: E402
from panel_scene import FakeScene  # noqa: E402
from RadFMModuleLib import assistant as assistant_module  # noqa: E402
from RadFMModuleLib.assistant import Assistant  # noqa: E402
from RadFMModuleLib.chat_panel import ChatPanel  # noqa: E402
from RadFMModuleLib.qt_shim import IN_SLICER, QtCore, QtGui, QtWidgets, get  # noqa: E402
from RadFMModuleLib.settings import ModelSettings  # noqa: E402
from RadFMModuleLib.turn_views import STOP_NOTES, ZERO_WIDTH_SPACE  # noqa: E402
from RadFMSlicer.session import Session  # noqa: E402

QUESTION = ("Is there a pleural effusion?", "Which side?")  # typed with Shift+Enter between the lines
TIMEOUT_S = 240
WIDTHS = (400, 420, 440)  # Slicer's module panel, narrow to roomy


def step(text):
    print(f"ok   {text}", flush=True)


def check(condition, what):
    if not condition:
        raise SystemExit(f"FAIL {what}")


def wait_until(condition, what):
    """Run Qt's own event loop (in C++, as Slicer's main window does) until ``condition()``.

    PythonQt as CTK sets it up keeps the GIL while Qt runs, so the panel's threads only
    move while Python code runs on the GUI thread; a Python sleep loop would hide that.
    """
    end = time.monotonic() + TIMEOUT_S
    loop, timer = QtCore.QEventLoop(), QtCore.QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: loop.quit() if condition() or time.monotonic() > end else None)
    timer.start()
    if not condition():
        loop.exec()
    timer.stop()
    check(condition(), f"timed out after {TIMEOUT_S} s waiting for {what}")


def send(widget, kind, key, text, modifiers=QtCore.Qt.NoModifier):
    event = QtGui.QKeyEvent(kind, key, modifiers, text)
    event.ignore()  # as Qt's shortcut map sends ShortcutOverride: accepted only if the widget claims the key
    QtWidgets.QApplication.sendEvent(widget, event)
    return event.isAccepted()


def type_keys(widget, text):
    """Each character as a keyboard delivers it; the text box must claim every key from the shortcuts."""
    for char in text:
        key = ord(char.upper())  # Qt key codes of ASCII keys are their upper-case character codes
        check(send(widget, QtCore.QEvent.ShortcutOverride, key, char),
              f"the text box claims {char!r} (ShortcutOverride accepted), so no single-key shortcut fires")
        send(widget, QtCore.QEvent.KeyPress, key, char)
        send(widget, QtCore.QEvent.KeyRelease, key, char)


def open_panel(scene, store):
    panel = ChatPanel(Assistant(scene), store)
    panel.resize(440, 940)
    panel.show()
    return panel


def main(worker_python, fixture, out):
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    binding = "PythonQt (flat qt module)" if IN_SLICER else "PySide6"
    step(f"binding {binding}, Python {sys.version.split()[0]}, Qt {QtCore.qVersion()}; "
         f"{', '.join(BLOCKED)} blocked")
    store = QtCore.QSettings(os.path.join(out, "radfm.ini"), QtCore.QSettings.IniFormat)
    ModelSettings(checkpoint_folder=fixture, device="cpu", precision="float32", worker_python=worker_python).save(store)
    scene = FakeScene()
    assistant_module.TASK_TOKENS["vqa"] = 16  # the first answer short (the tiny model rarely ends by itself)

    panel = open_panel(scene, store)
    check(get(panel.region_list, "count") == 3, "the panel lists the scene's segment, ROI box and line")
    check(get(panel.volume_box, "toolTip") == get(panel.volume_box, "currentText") != "",
          "the scan box names the chosen scan in its tooltip (a long name is cut in the box)")
    step(f"panel built: scan {get(panel.volume_box, 'currentText')!r}, {get(panel.region_list, 'count')} regions")

    panel.ask("vqa")
    check(not panel.busy_now and get(panel.status_label, "text") == "Type a question first.",
          "asking with an empty box says what is missing")
    step("an empty question is refused: 'Type a question first.'")

    panel.input.setFocus()
    type_keys(panel.input, QUESTION[0])
    send(panel.input, QtCore.QEvent.KeyPress, QtCore.Qt.Key_Return, "\r", QtCore.Qt.ShiftModifier)
    type_keys(panel.input, QUESTION[1])
    question = "\n".join(QUESTION)
    check(panel.input.toPlainText() == question, f"typed text arrives in the box (got {panel.input.toPlainText()!r})")
    check(not panel.busy_now, "Shift+Enter starts a new line instead of sending")
    type_keys(panel.history_edit, "58 y, cough")
    check(get(panel.history_edit, "text") == "58 y, cough", "typed history arrives in the history box")
    step(f"typed {len(question)} keys (Shift+Enter among them) into the question box and 11 into history; "
         f"every ShortcutOverride claimed by the box")

    sent_at = time.monotonic()
    send(panel.input, QtCore.QEvent.KeyPress, QtCore.Qt.Key_Return, "\r")
    check(panel.state == "connecting" and panel.input.toPlainText() == "", "Enter sends the question")
    step("Enter sent the question; the panel is connecting")
    wait_until(lambda: not panel.busy_now, "the first answer")
    answered_s = time.monotonic() - sent_at
    turn, view = panel.assistant.session.turns[-1], panel.answers[-1]
    check(turn.error is None and turn.stop_reason in ("eos", "length"), f"an answer streams in (turn: {turn.error})")
    check(get(view.body, "text") == turn.answer != "", "the streamed words are the recorded answer")
    check(get(panel.status_label, "text") == STOP_NOTES.get(turn.stop_reason, "Answer complete."), "status says done")
    check(view.thumbs.count() >= 1 and "Image 1: CT chest 2024-03-01 (current)" in get(view.details, "text"),
          "the answer shows what the model saw")
    log = panel.log_view.toPlainText()
    check("Starting the model worker" in log and "Loading the model" in log, "the log pane shows the worker's start")
    timing = turn.provenance["timing"]
    step(f"streamed {timing['new_tokens']} tokens ({turn.stop_reason}), shown {answered_s:.1f} s after Enter "
         f"(worker start and load included; in the worker: prepare {timing.get('prepare_and_encode_s')} s, "
         f"generate {timing.get('generate_s')} s); {len(log.splitlines())} log lines")

    view.details_button.click()
    check(view.details.isVisible() and get(view.details_button, "checked"), "What the model saw opens")
    panel.copy_answer()
    check(QtWidgets.QApplication.clipboard().text() == turn.answer, "Copy answer puts it on the clipboard")
    step("opened what the model saw; copied the answer")

    def prepared_ahead():
        return panel.log_view.toPlainText().count("prepared ahead of the question")

    panel.volume_box.setCurrentIndex(panel.volume_box.findData("prior"))  # the radiologist moves on to the prior
    wait_until(lambda: prepared_ahead() == 1, "the prior prepared ahead of a question")
    panel.volume_box.setCurrentIndex(panel.volume_box.findData("ct"))
    wait_until(lambda: prepared_ahead() == 2, "the CT prepared ahead again")
    check(not panel.busy_now and len(panel.assistant.session.turns) == 1, "preparing ahead records no turn")
    step("choosing another scan had the worker read and encode it before any question")

    panel.prior_box.setCurrentIndex(panel.prior_box.findData("prior"))
    panel.window_box.setCurrentIndex(panel.window_box.findData("lung"))
    panel.region_list.item(0).setCheckState(QtCore.Qt.Checked)  # the segment
    assistant_module.TASK_TOKENS["report"] = 1500  # a long answer, to stop in the middle
    panel.task_buttons[0].click()  # Draft report
    wait_until(lambda: panel._answer is not None and panel._answer.text.strip(), "the report's first words")
    panel.stop_button.click()
    check(panel.state == "stopping" and get(panel.status_label, "text") == "Stopping\u2026", "Stop says stopping")
    wait_until(lambda: not panel.busy_now, "the stopped report")
    turn, view = panel.assistant.session.turns[-1], panel.answers[-1]
    check(turn.stop_reason == "cancelled" and turn.provenance["timing"]["new_tokens"] < 1500, "Stop cancels")
    check(get(view.state, "text") == "stopped" and get(view.body, "text") == turn.answer,
          "the words so far are kept")
    check(panel.ask_button.isEnabled() and not panel.stop_button.isEnabled(), "the panel is idle again")
    check([image.role for image in turn.images] == ["current", "prior", "region"], "the report saw scan, prior, segment")
    step(f"Stop after {turn.provenance['timing']['new_tokens']} report tokens; the words so far kept")

    markdown, as_json = os.path.join(out, "talk.md"), os.path.join(out, "talk.json")
    panel.export(markdown, "md")
    panel.export(as_json, "json")
    with open(markdown, encoding="utf-8") as f:
        text = f.read()
    check(QUESTION[0] in text and "Research use only" in text, "the Markdown export has the question and the notice")
    with open(as_json, encoding="utf-8") as f:
        exported = Session.from_json(f.read())
    check([t.stop_reason for t in exported.turns][-1] == "cancelled" and len(exported.turns) == 2, "JSON export")
    check(get(panel.status_label, "text") == "Conversation saved as talk.json", "the status names the saved file")
    step("exported Markdown and JSON")

    long_name = "RadFM_conversation_CT_chest_20240301_follow_up_patient_1234567.json"  # no break for Qt in it
    panel.export(os.path.join(out, long_name), "json")
    check(get(panel.status_label, "text").replace(ZERO_WIDTH_SPACE, "") == f"Conversation saved as {long_name}",
          "the status names a long file name in full")
    sections = (panel.settings_section.toggle, panel.log_section.toggle)
    for toggle in sections:
        toggle.click()  # open: their texts are checked too
    for width in WIDTHS:
        cut = unreadable_at(panel, width, height=1400)
        panel.grab().save(os.path.join(out, f"panel-{width}.png"))
        check(not cut, f"at {width} px every text reads in full, but: " + "; ".join(cut))
    for toggle in sections:
        toggle.click()
    # The open sections' minimum height goes only after a layout pass: resize until it has.
    wait_until(lambda: panel.resize(440, 940) or get(panel, "height") == 940, "the panel back to 440 x 940")
    step(f"at {', '.join(map(str, WIDTHS))} px wide the status (a long file name too), the question's context "
         f"and every label read in full")

    reopened = open_panel(scene, store)
    check([get(v.body, "text") for v in reopened.answers] == [t.answer for t in exported.turns],
          "a new panel restores the conversation saved in the scene")
    check(reopened.answers[0].thumbs.count() >= 1, "restored answers keep their thumbnails")
    reopened.reload()  # what the module does when the scene is closed or loaded
    check(len(reopened.answers) == 2 and not reopened.busy_now, "reloading from the scene shows the conversation")
    reopened.log_section.toggle.click()
    check(reopened.log_view.isVisible(), "the Log section opens")
    step(f"restored {len(reopened.answers)} answers in a new panel; reloaded; opened its Log")

    panel.precision_box.setCurrentText("bfloat16")
    check(ModelSettings.load(store).precision == "bfloat16", "a changed model setting is stored")
    QtWidgets.QApplication.processEvents()  # pending layout requests first
    panel.grab().save(os.path.join(out, "panel.png"))
    worker = panel.assistant.client.proc
    panel.close()
    reopened.close()
    deadline = time.monotonic() + 10
    while worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    check(worker.poll() is not None and panel.state == "idle", "closing the panel ends its worker")
    step("closed the panel: worker ended")

    check(all(sys.modules[name] is None for name in BLOCKED), "no blocked package was loaded")
    del app
    print("PANEL SMOKE PASSED", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__.split("\n\n")[-1])
    main(*sys.argv[1:])
