"""RadFM: ask the RadFM radiology foundation model (run locally) about the scan in the viewer.

The usual four classes of a Slicer scripted module. The chat panel, the assistant and the
settings live in ``RadFMModuleLib`` (Slicer-free); the model runs in a separate worker
process (``RadFMSlicer.worker``), so nothing heavy is imported when Slicer starts.
"""

import json
import logging
import os
import platform
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

# Slicer 5.8 and older ship Python 3.9, where the library's annotations (``str | None``) fail at
# import: say which Slicer is needed instead of failing to load. This file must parse on 3.9.
UNSUPPORTED = "" if sys.version_info >= (3, 10) else (
    f"RadFM needs Slicer 5.10 or newer (Python 3.10 or newer); this Slicer runs Python "
    f"{platform.python_version()}. Install a current Slicer from https://download.slicer.org."
)
END_TO_END_VARIABLE = "RADFM_SELFTEST_END_TO_END"  # "1": the self-test also runs the model (downloads, torch)

_SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_SOURCE_TREE, "RadFMSlicer")) and _SOURCE_TREE not in sys.path:
    sys.path.append(_SOURCE_TREE)  # run from a source checkout: the core library sits beside RadFMModule/

if not UNSUPPORTED:
    import vtk
    from RadFMModuleLib import dependencies
    from RadFMModuleLib.assistant import WINDOW_AS_SHOWN, Assistant, Selection, start_worker_client
    from RadFMModuleLib.chat_panel import ChatPanel
    from RadFMModuleLib.qt_shim import QtCore, QtWidgets, get
    from RadFMModuleLib.results_view import ResultsView
    from RadFMModuleLib.scene_adapters import SlicerScene, store_regions, stored_regions
    from RadFMModuleLib.settings import ModelSettings
else:
    WINDOW_AS_SHOWN = "view"

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


def watched_events() -> dict:
    """Node class -> the events after which the scan or region lists may read differently (debounced)."""
    markups = slicer.vtkMRMLMarkupsNode
    segments = slicer.vtkSegmentation
    modified = vtk.vtkCommand.ModifiedEvent  # renamed, among other changes
    return {
        "vtkMRMLMarkupsNode": (markups.PointAddedEvent, markups.PointRemovedEvent, markups.PointModifiedEvent,
                               markups.PointPositionDefinedEvent, markups.PointPositionUndefinedEvent,
                               modified),  # points placed, moved, removed; renamed
        "vtkMRMLSegmentationNode": (segments.SegmentAdded, segments.SegmentRemoved, segments.SegmentModified,
                                    modified),
        "vtkMRMLVolumeNode": (modified,),  # renamed, or given its voxels
    }


class RadFMModuleWidget(ScriptedLoadableModuleWidget, slicer.util.VTKObservationMixin):
    """Puts the chat panel in the module panel and keeps it in step with the scene."""

    def __init__(self, parent=None):
        self.panel = None
        slicer.util.VTKObservationMixin.__init__(self)  # first: without a parent, Slicer's __init__ runs setup()
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        if UNSUPPORTED:
            import qt

            label = qt.QLabel(UNSUPPORTED)
            label.setWordWrap(True)
            self.layout.addWidget(label)
            return
        self.logic = RadFMModuleLogic()
        self.panel = ChatPanel(self.logic.assistant, QtCore.QSettings())
        # install output goes to the panel's log pane
        self.panel.before_connect = lambda: dependencies.ensure(self.logic.assistant.settings, log=self.panel.log)
        self.results = ResultsView(self.logic.assistant.scene)  # an eval run's cases, beside the chat
        self.results.ask_again = self._ask_again
        self.tabs = QtWidgets.QTabWidget()
        self.tabs.addTab(self.panel, "Chat")
        self.tabs.addTab(self.results, "Results")
        self.layout.addWidget(self.tabs)
        self._refresh = QtCore.QTimer()  # many events arrive at once (a scene loads, a point is dragged): refresh once
        self._refresh.setSingleShot(True)
        self._refresh.setInterval(200)
        self._refresh.timeout.connect(self._follow_and_refresh)
        self._watched = {}  # node -> events observed on it
        self._watched_events = watched_events()
        scene = slicer.mrmlScene
        for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent):  # a loading scene adds many: follow once
            self.addObserver(scene, event, self._schedule_refresh)
        self.addObserver(scene, scene.StartCloseEvent, lambda *args: self.panel.cancel_quietly())
        self.addObserver(scene, scene.EndCloseEvent, self._reload)
        self.addObserver(scene, scene.EndImportEvent, self._reload)
        self._follow_nodes()
        self._schedule_refresh()
        self._applying = False
        self._show_kept_selection(self.logic.kept_selection())
        for box in (self.panel.volume_box, self.panel.prior_box, self.panel.window_box):
            box.activated.connect(self._keep_selection)  # the radiologist's choices only, not a refresh's
        self.panel.region_list.itemChanged.connect(self._keep_selection)

    def _ask_again(self, volume_id, case):
        """A Results case asked in the chat about its scan, just loaded, with the panel's current settings."""
        self.panel.refresh_scene()
        self.panel.select(Selection(volume_id=volume_id, window=self.panel.selection().window))
        self.panel.input.setPlainText(case.get("question") or "")
        self.tabs.setCurrentWidget(self.panel)
        self.panel.ask(case["task"])

    def _reload(self, *args):
        """A scene was closed or loaded: its conversation, and the choices saved with it."""
        kept = self.logic.kept_selection()  # before the panel's refresh re-lists (and re-checks) regions
        self.panel.reload()
        self._show_kept_selection(kept)

    def _show_kept_selection(self, kept):
        if kept is None:
            return
        self._applying = True
        try:
            self.panel.select(kept)
        finally:
            self._applying = False
        self._keep_selection()

    def _keep_selection(self, *args):
        if not self._applying:
            self.logic.keep_selection(self.panel.selection())

    def _follow_nodes(self):
        """Observe the volumes, markups and segmentations now in the scene (and only those)."""
        wanted = {node: events for cls, events in self._watched_events.items()
                  for node in slicer.util.getNodesByClass(cls)}
        for node, events in self._watched.items():
            if node not in wanted:
                for event in events:
                    self.removeObserver(node, event, self._schedule_refresh)
        for node, events in wanted.items():
            if node not in self._watched:
                for event in events:
                    self.addObserver(node, event, self._schedule_refresh)
        self._watched = wanted

    def _schedule_refresh(self, *args):
        self._refresh.start()

    def _follow_and_refresh(self):
        """The debounced refresh: the observers follow the nodes added and removed meanwhile, then the panel re-lists.
        (A region node's own events before then need no observer: this refresh is already due.)"""
        self._follow_nodes()
        self.panel.refresh_scene()

    def enter(self):
        if self.panel is not None:
            self.panel.refresh_scene()  # segments added in other modules since last time

    def cleanup(self):
        if self.panel is None:
            return
        self.removeObservers()
        self._watched = {}
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

    The conversation is kept in the scene (a text node), like the panel's; the panel's choices
    (scan, prior, regions, window, which conversation) in the module's parameter node, so the
    scene saves both.
    """

    def __init__(self, start_client=start_slicer_worker):
        ScriptedLoadableModuleLogic.__init__(self)
        if UNSUPPORTED:
            raise RuntimeError(UNSUPPORTED)
        self.assistant = Assistant(SlicerScene(self.getParameterNode), start_client,
                                   ModelSettings.load(QtCore.QSettings()))

    def ask(self, question="", task="vqa", volume=None, prior=None, regions=(), window=WINDOW_AS_SHOWN,
            history="", timeout=600):
        """Ask and wait; returns the recorded turn (``.answer``, ``.images``, ``.provenance``).

        volume/prior: nodes or node ids (default: the volume in the red slice view);
        regions: ids as listed by ``logic.assistant.scene.regions()``.
        """
        scene = self.assistant.scene
        scans = [v.id for v in scene.volumes() if v.kind == "volume"]
        volume_id = _node_id(volume) or scene.shown_volume_id() or next(iter(scans), None)
        selection = Selection(volume_id, _node_id(prior), tuple(regions), window, history)
        args = self.assistant.build_ask(task, question, selection)
        if not dependencies.ensure(self.assistant.settings, log=logging.info):
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


    def keep_selection(self, selection: "Selection") -> None:
        """In the parameter node, as node references: an imported scene renames ids and its
        references with them, so a kept selection always names one study's nodes."""
        node = self.getParameterNode()
        node.SetNodeReferenceID("Scan", selection.volume_id)
        node.SetNodeReferenceID("Prior", selection.prior_id)
        store_regions(node, selection.region_ids)
        node.SetParameter("Window", json.dumps(selection.window))

    def kept_selection(self) -> "Selection | None":
        """The selection saved in the scene, or None if nothing was chosen in it yet."""
        node = self.getParameterNode()
        if not node.GetParameter("Window"):
            return None
        try:
            window = json.loads(node.GetParameter("Window"))
        except ValueError:
            return None
        return Selection(node.GetNodeReferenceID("Scan"), node.GetNodeReferenceID("Prior"), stored_regions(node), window)


def _node_id(node):
    return node if (node is None or isinstance(node, str)) else node.GetID()


class RadFMModuleTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test.

    The light test always runs (also on the Extensions build machines): no torch, no sample
    data download, no worker. The end-to-end tests (Slicer's CTChest sample, a tiny random
    checkpoint, the real worker) need torch and a download, so, as TotalSegmentator does,
    they are off unless RADFM_SELFTEST_END_TO_END=1.

    ``runTest`` calls the tests directly (Slicer's "Reload and Test" never runs unittest
    cleanups), so each test tidies up in ``finally``.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_panel_follows_the_scene()
        if os.environ.get(END_TO_END_VARIABLE) != "1":
            logging.warning(f"RadFM end-to-end self-test skipped (set {END_TO_END_VARIABLE}=1 to run it)")
            return
        self.setUp()
        self.test_logic_answers_about_sample_ct()
        self.setUp()
        self.test_panel_streams_an_answer()

    def _wait_for(self, condition, what, timeout_s=5.0):
        deadline = time.monotonic() + timeout_s
        while not condition():
            self.assertLess(time.monotonic(), deadline, f"the panel did not show {what}")
            slicer.app.processEvents()
            time.sleep(0.01)

    @staticmethod
    def _add_volume(class_name, name, components):
        image = vtk.vtkImageData()
        image.SetDimensions(16, 16, 4)
        image.AllocateScalars(vtk.VTK_SHORT, components)
        node = slicer.mrmlScene.AddNewNodeByClass(class_name, name)
        node.SetAndObserveImageData(image)
        return node

    def test_panel_follows_the_scene(self):
        """The module's widget lists scans and regions as the scene changes under it (light: no model)."""
        widget = RadFMModuleWidget()  # no parent: Slicer's base class makes one and runs setup()
        try:
            panel = widget.panel
            self._add_volume("vtkMRMLScalarVolumeNode", "Chest CT", 1)
            self._add_volume("vtkMRMLVectorVolumeNode", "Photo", 3)

            def scans():
                return [panel.volume_box.itemText(n) for n in range(get(panel.volume_box, "count"))]

            def regions():
                return [panel.region_list.item(n).text() for n in range(get(panel.region_list, "count"))]

            self._wait_for(lambda: scans() == ["Chest CT"], "the scalar volume alone")
            self.assertIn("Photo \u2014 a colour or vector volume", get(panel.skipped_label, "text"))
            line = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "Line 1")
            line.AddControlPointWorld([0.0, 0.0, 0.0])
            line.AddControlPointWorld([0.0, 0.0, 10.0])  # placed while the module is shown
            self._wait_for(lambda: "Line 1 (line, 10.0 mm)" in regions(), "the new line")
            line.SetNthControlPointPositionWorld(1, [0.0, 0.0, 25.0])  # moved
            self._wait_for(lambda: "Line 1 (line, 25.0 mm)" in regions(), "the moved line's length")
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
            segment_id = segmentation.GetSegmentation().AddEmptySegment("lesion", "Lesion")
            self._wait_for(lambda: "Lesion (segment)" in regions(), "the added segment")
            segmentation.GetSegmentation().GetSegment(segment_id).SetName("Nodule")
            self._wait_for(lambda: "Nodule (segment)" in regions(), "the renamed segment")
            segmentation.GetSegmentation().RemoveSegment(segment_id)
            self._wait_for(lambda: not any("Nodule" in r for r in regions()), "the segment removed")
        finally:
            widget.cleanup()
            widget.parent.deleteLater()  # the window Slicer's base class made for it
        self.delayDisplay("Panel: scans and regions follow the scene")

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
