"""RadFM: ask the RadFM radiology foundation model (run locally) about the scan in the viewer.

The usual four classes of a Slicer scripted module. The chat panel, the assistant and the
settings live in ``RadFMModuleLib`` (Slicer-free); the model runs in a separate worker
process (``RadFMSlicer.worker``), so nothing heavy is imported when Slicer starts.
"""

import logging
import os
import shutil
import sys
import tempfile
import time

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

_SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_SOURCE_TREE, "RadFMSlicer")) and _SOURCE_TREE not in sys.path:
    sys.path.append(_SOURCE_TREE)  # run from a source checkout: the core library sits beside RadFMModule/

from RadFMModuleLib import dependencies  # noqa: E402
from RadFMModuleLib.assistant import WINDOW_AS_SHOWN, Assistant, Selection, start_worker_client  # noqa: E402
from RadFMModuleLib.chat_panel import ChatPanel  # noqa: E402
from RadFMModuleLib.qt_shim import QtCore  # noqa: E402
from RadFMModuleLib.scene_adapters import SlicerScene  # noqa: E402
from RadFMModuleLib.settings import ModelSettings  # noqa: E402

DISCLAIMER = (
    "<b>Research use only.</b> RadFM is a research model, not a medical device. Its answers can be wrong "
    "or invented and must not be used for diagnosis or treatment; a qualified reader must check every "
    "statement against the images."
)


class RadFMModule(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "RadFM"
        parent.categories = ["Radiology AI"]
        parent.dependencies = []
        parent.contributors = ["RadFMSlicer contributors"]
        parent.helpText = (
            "Ask the RadFM radiology foundation model, running on this computer, about the scan in the "
            "viewer: draft a report, ask a question, get a diagnosis with its rationale, or the modality. "
            "Mark a region with a segment or an ROI box to ask about it; add a prior study to compare. "
            "Each answer shows exactly what the model was shown (images, window, region crop).<br><br>"
            + DISCLAIMER
        )
        parent.acknowledgementText = (
            "RadFM is by Chaoyi Wu, Xiaoman Zhang, Ya Zhang, Yanfeng Wang and Weidi Xie: \"Towards Generalist "
            "Foundation Model for Radiology by Leveraging Web-scale 2D&amp;3D Medical Data\" (2023). "
            "This module runs their released weights locally; it is not affiliated with the authors."
        )


class RadFMModuleWidget(ScriptedLoadableModuleWidget):
    """Puts the chat panel in the module panel and keeps it in step with the scene."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = RadFMModuleLogic()
        self.panel = ChatPanel(self.logic.assistant, QtCore.QSettings())
        self.panel.before_connect = lambda: dependencies.ensure(self.logic.assistant.settings)
        self.layout.addWidget(self.panel)
        self._refresh = QtCore.QTimer()  # many nodes arrive at once when a scene loads: refresh once
        self._refresh.setSingleShot(True)
        self._refresh.setInterval(200)
        self._refresh.timeout.connect(self.panel.refresh_scene)
        scene = slicer.mrmlScene
        self._observers = [
            scene.AddObserver(scene.NodeAddedEvent, lambda *args: self._refresh.start()),
            scene.AddObserver(scene.NodeRemovedEvent, lambda *args: self._refresh.start()),
            scene.AddObserver(scene.StartCloseEvent, lambda *args: self.panel.cancel_quietly()),
            scene.AddObserver(scene.EndCloseEvent, lambda *args: self.panel.reload()),
            scene.AddObserver(scene.EndImportEvent, lambda *args: self.panel.reload()),
        ]

    def enter(self):
        self.panel.refresh_scene()  # segments added in other modules since last time

    def cleanup(self):
        for tag in self._observers:
            slicer.mrmlScene.RemoveObserver(tag)
        self._refresh.stop()
        self.panel.shutdown()


def start_slicer_worker(python):
    """Without a chosen Python the worker runs in Slicer's own (PythonSlicer, not the app itself)."""
    return start_worker_client(python or shutil.which("PythonSlicer"))


class RadFMModuleLogic(ScriptedLoadableModuleLogic):
    """No GUI. From Slicer's Python console::

        logic = slicer.util.getModuleLogic("RadFMModule")
        logic.assistant.settings.checkpoint_folder = "/models/RadFM"
        print(logic.ask("Is there a pleural effusion?", window="lung").answer)

    The conversation is kept in the scene (a text node), like the panel's.
    """

    def __init__(self, start_client=start_slicer_worker):
        ScriptedLoadableModuleLogic.__init__(self)
        self.assistant = Assistant(SlicerScene(), start_client, ModelSettings.load(QtCore.QSettings()))

    def ask(self, question="", task="vqa", volume=None, prior=None, regions=(), window=WINDOW_AS_SHOWN,
            history="", timeout=600):
        """Ask and wait; returns the recorded turn (``.answer``, ``.images``, ``.provenance``).

        volume/prior: nodes or node ids (default: the volume in the red slice view);
        regions: ids as listed by ``logic.assistant.scene.regions()``.
        """
        scene = self.assistant.scene
        volume_id = _node_id(volume) or scene.shown_volume_id() or next((v.id for v in scene.volumes()), None)
        selection = Selection(volume_id, _node_id(prior), tuple(regions), window, history)
        args = self.assistant.build_ask(task, question, selection)
        if not dependencies.ensure(self.assistant.settings):
            raise RuntimeError("RadFM's Python packages are not installed.")
        request = self.assistant.connect(logging.info).ask(**args)
        for event in request.events(timeout=timeout):
            if event.kind == "status":
                logging.info(event.text)
            elif event.kind == "done":
                return self.assistant.record(event.data.get("turn") or {"task": task, "question": question,
                                                                       "stop_reason": "cancelled"})
            elif event.kind == "error":
                self.assistant.record({"task": task, "question": question, "stop_reason": "error", "error": event.text})
                raise RuntimeError(event.text)
        raise RuntimeError("the worker ended without an answer")


def _node_id(node):
    return node if (node is None or isinstance(node, str)) else node.GetID()


class RadFMModuleTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: Slicer's CTChest sample, a tiny random checkpoint, the real worker.

    ``runTest`` calls the tests directly (Slicer's "Reload and Test" never runs unittest
    cleanups), so each test tidies up in ``finally``.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_logic_answers_about_sample_ct()
        self.setUp()
        self.test_panel_streams_an_answer()

    def _tiny_model(self, folder):
        missing = dependencies.missing_requirements()
        self.assertFalse(missing, f"install RadFM's Python packages first (open the module and ask once): {missing}")
        import SampleData
        from RadFMSlicer.testing import make_tiny_checkpoint

        self.delayDisplay("Loading CTChest and making a tiny random checkpoint")
        volume = SampleData.downloadSample("CTChest")
        make_tiny_checkpoint(folder)
        return volume, ModelSettings(checkpoint_folder=folder, device="cpu", precision="float32")

    def test_logic_answers_about_sample_ct(self):
        folder = tempfile.mkdtemp(prefix="radfm-selftest-")
        logic = RadFMModuleLogic()
        try:
            volume, logic.assistant.settings = self._tiny_model(folder)
            turn = logic.ask("Is there a pleural effusion?", volume=volume, window="lung", timeout=300)
            self.assertIsNone(turn.error)
            self.assertIn(turn.stop_reason, ("eos", "length"))
            self.assertEqual(turn.images[0].role, "current")
            self.assertIn("pleural effusion", logic.assistant.scene.load_session_json())
        finally:
            logic.assistant.close()
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Logic: answer received and saved in the scene")

    def test_panel_streams_an_answer(self):
        folder = tempfile.mkdtemp(prefix="radfm-selftest-")
        store = QtCore.QSettings(os.path.join(folder, "settings.ini"), QtCore.QSettings.IniFormat)
        panel = None
        try:
            self._tiny_model(folder)[1].save(store)
            panel = ChatPanel(Assistant(SlicerScene(), start_slicer_worker), store)
            panel.input.setPlainText("Describe the lungs.")
            panel.ask("vqa")
            deadline = time.monotonic() + 300
            while panel.busy_now and time.monotonic() < deadline:
                slicer.app.processEvents()
                time.sleep(0.02)
            self.assertFalse(panel.busy_now, "no answer within 5 minutes")
            turns = panel.assistant.session.turns
            self.assertEqual(len(turns), 1)
            self.assertIsNone(turns[0].error, turns[0].error)
        finally:
            if panel is not None:
                panel.shutdown()
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Panel: answer streamed through the worker")
