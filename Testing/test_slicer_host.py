"""The module in its host: the widget's life in a scene, saved scenes, first-use install.

Everything runs on Slicer's own MRML (slicer-core, started as the application starts it:
``slicer_host``), with the Qt half it lacks from ``slicer_standin``, real Qt (PySide6,
offscreen) and the scripted worker client: the widget's ``setup()`` and ``cleanup()``, scene
and node observers, real ``.mrb`` files saved, opened and added to an open scene, the
install dialogs. Nodes are made with the calls Slicer code uses.
"""

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import vtk

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "RadFMModule"))

from scripted_worker import ScriptedWorkerClient, tokens  # noqa: E402

IJK_TO_RAS = np.diag([0.8, 0.8, 5.0, 1.0])
SHAPE = (8, 40, 40)


@pytest.fixture
def module(slicer, qtbot, tmp_path, monkeypatch):
    """RadFMModule imported over the stand-in, its QSettings in tmp_path."""
    from RadFMModuleLib.qt_shim import QtCore

    QtCore.QSettings.setDefaultFormat(QtCore.QSettings.IniFormat)
    QtCore.QSettings.setPath(QtCore.QSettings.IniFormat, QtCore.QSettings.UserScope, str(tmp_path / "settings"))
    sys.modules.pop("RadFMModule", None)
    return importlib.import_module("RadFMModule")


def add_ct(slicer, name="CT", value=40):
    """A CT as a script adds one, shown in the slice views (as loading a scan shows it), window 40/400."""
    array = np.full(SHAPE, -1000, dtype=np.int16)
    array[2:6, 10:30, 10:30] = value
    node = slicer.util.addVolumeFromArray(array, IJK_TO_RAS, name)
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(400.0, 40.0)
    slicer.util.setSliceViewerLayers(background=node)
    return node


def add_segmentation(slicer, reference, segments: dict, name="Segmentation"):
    """segment id -> (name, mask on ``reference``'s grid), as the Segment Editor leaves them."""
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    for segment_id, (segment_name, mask) in segments.items():
        node.GetSegmentation().AddEmptySegment(segment_id, segment_name)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, segment_id, reference)
    return node


def scripted_logic(module, scripts, tmp_path):
    from RadFMModuleLib.settings import ModelSettings

    logic = module.RadFMModuleLogic(start_client=lambda python: ScriptedWorkerClient(scripts))
    logic.assistant.settings = ModelSettings(str(tmp_path), "cpu", "float32", worker_python=sys.executable)
    return logic


# ---------------------------------------------------------------------------------- Slicer as it is
def write_scan(path, array, vector=False):
    """A scan file as a scanner export gives it (SimpleITK writes NRRD, NIfTI, ...)."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path))
    return str(path)


def write_dwi(path, gradients: int = 3):
    """A diffusion-weighted NRRD as DWIConvert writes one: a list axis of gradients, a b-value and a direction
    per gradient (the first a b0)."""
    data = np.arange(4 * 5 * 6 * gradients, dtype=np.int16).reshape(4, 5, 6, gradients)
    header = ["NRRD0005", "type: short", "dimension: 4", "space: right-anterior-superior",
              f"sizes: {gradients} 6 5 4", "kinds: list domain domain domain", "endian: little", "encoding: raw",
              "space origin: (0,0,0)", "space directions: none (2,0,0) (0,2,0) (0,0,2)",
              "measurement frame: (1,0,0) (0,1,0) (0,0,1)", "modality:=DWMRI", "DWMRI_b-value:=1000"]
    header += [f"DWMRI_gradient_{g:04d}:=" + " ".join("1" if axis == g - 1 else "0" for axis in range(3))
               for g in range(gradients)]
    path.write_bytes(("\n".join(header) + "\n\n").encode() + data.astype("<i2").tobytes())
    return str(path)


def test_files_load_as_slicers_own_node_classes_and_only_a_scan_is_offered(slicer, tmp_path):
    """The volumes logic decides the node class: an RGB file is a vector volume and a diffusion-weighted file a
    DWI volume (both refused, with why), a label map file asked as one is a label-map node (not listed), a 4D
    NIfTI does not load at all."""
    import nibabel

    from RadFMModuleLib.scene_adapters import SlicerScene

    ct = slicer.util.loadVolume(write_scan(tmp_path / "ct.nrrd", np.full(SHAPE, 40, np.int16)))
    photo = slicer.util.loadVolume(write_scan(tmp_path / "photo.nrrd", np.zeros((1, 6, 8, 3), np.uint8), vector=True))
    labels = slicer.util.loadVolume(write_scan(tmp_path / "labels.nrrd", np.ones(SHAPE, np.uint8)), {"labelmap": True})
    dwi = slicer.util.loadVolume(write_dwi(tmp_path / "dwi.nrrd"))
    assert (ct.GetClassName(), photo.GetClassName(), labels.GetClassName(), dwi.GetClassName()) == (
        "vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode", "vtkMRMLLabelMapVolumeNode",
        "vtkMRMLDiffusionWeightedVolumeNode")
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 5, 6, 3), np.int16), np.eye(4)), tmp_path / "fmri.nii.gz")
    with pytest.raises(RuntimeError, match="Failed to load"):
        slicer.util.loadVolume(str(tmp_path / "fmri.nii.gz"))
    items = {item.name: item for item in SlicerScene().volumes()}
    assert {name: item.kind for name, item in items.items()} == {"ct": "volume", "photo": "unsupported",
                                                                  "dwi": "unsupported"}
    assert "colour or vector volume" in items["photo"].detail
    assert items["dwi"].detail == "a diffusion-weighted volume (one image per gradient)"
    display = ct.GetDisplayNode()  # loaded: Slicer computed its window, which "as shown" sends
    assert display.GetAutoWindowLevel() and SlicerScene().volume(ct.GetID()).window == (display.GetLevel(),
                                                                                          display.GetWindow())


def test_the_scene_slicer_starts_with(slicer):
    """One slice node per view, found by layout name; ids start again after the scene is cleared; the
    Inferno colour table is one of Slicer's colour files, absent where they are (slicer-core ships none)."""
    red = [n for n in slicer.util.getNodesByClass("vtkMRMLSliceNode") if n.GetLayoutName() == "Red"]
    assert len(red) == 1 and red[0].GetSingletonTag() == "Red" and red[0].GetOrientation() == "Axial"
    first = add_ct(slicer)
    slicer.mrmlScene.Clear(0)
    assert add_ct(slicer).GetID() == first.GetID()  # an id kept across a scene close names another node
    assert slicer.mrmlScene.GetNodeByID("vtkMRMLColorTableNodeFileInferno.txt") is None
    assert slicer.mrmlScene.GetNodeByID("vtkMRMLColorTableNodeGrey") is not None


def test_reading_a_segment_fires_scene_events_and_leaves_the_scene_as_it_was(slicer):
    """Slicer's export goes through a temporary label map with its display and colour nodes: the scene
    observers see them come and go, and the scene is the same afterwards."""
    volume = add_ct(slicer)
    segmentation = add_segmentation(slicer, volume, {"s1": ("Lesion", np.ones(SHAPE, bool))}, "S")
    added, removed, scene = [], [], slicer.mrmlScene
    scene.AddObserver(scene.NodeAddedEvent, lambda caller, event: added.append(event))
    scene.AddObserver(scene.NodeRemovedEvent, lambda caller, event: removed.append(event))
    before = scene.GetNumberOfNodes()
    from RadFMModuleLib.scene_adapters import SlicerScene

    mask = SlicerScene().segment_mask(f"{segmentation.GetID()}/s1", volume.GetID())
    assert mask.shape == SHAPE and mask.all()
    assert len(added) >= 3 and len(removed) == len(added) and scene.GetNumberOfNodes() == before


def test_a_study_whose_scan_file_is_missing_opens_with_the_scan_not_offered(slicer, module, tmp_path):
    """A .mrb whose volume file is gone (a cut copy, a moved data folder) opens with a volume node
    without voxels: listed as not offered, with why; the panel opens without a traceback."""
    import zipfile

    add_ct(slicer, "CT")
    assert slicer.util.saveScene(str(tmp_path / "study.mrb"))
    with zipfile.ZipFile(tmp_path / "study.mrb") as whole, zipfile.ZipFile(tmp_path / "cut.mrb", "w") as cut:
        for name in whole.namelist():
            if not name.endswith(".nrrd"):
                cut.writestr(name, whole.read(name))
    slicer.mrmlScene.Clear(0)
    with pytest.raises(RuntimeError, match="Failed to read node CT"):  # Slicer says so; the scene still opens
        slicer.util.loadScene(str(tmp_path / "cut.mrb"), {"clear": True})
    (ct,) = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
    widget = module.RadFMModuleWidget()
    try:
        assert widget.panel.volume_box.count() == 0
        assert "CT \u2014 a volume without voxels" in widget.panel.skipped_label.text()
    finally:
        widget.cleanup()


def test_a_line_whose_point_is_unplaced_leaves_the_region_list(slicer, module, qtbot):
    """Markups fire PointPositionUndefined when a point is unset (to be placed again): the line has no
    length then and is not offered until it is placed again."""
    line = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "Line 1")
    assert line.GetDisplayNode() is not None  # markups come with their display node
    line.AddControlPointWorld([0.0, 0.0, 0.0])
    line.AddControlPointWorld([0.0, 0.0, 10.0])
    widget = module.RadFMModuleWidget()
    panel = widget.panel
    try:
        assert panel.region_list.item(0).text() == "Line 1 (line, 10.0 mm)"
        line.UnsetNthControlPointPosition(1)
        qtbot.waitUntil(lambda: panel.region_list.item(0).text() == "No segments, ROI boxes or lines in the scene")
        line.SetNthControlPointPositionWorld(1, [0.0, 0.0, 20.0])
        qtbot.waitUntil(lambda: panel.region_list.item(0).text() == "Line 1 (line, 20.0 mm)")
    finally:
        widget.cleanup()


def test_a_saved_study_is_slicers_bundle_and_errors_show_and_reraise(slicer, dialogs, tmp_path):
    """A real .mrb: <name>/<name>.mrml and Data/; a long text (the conversation) is a file in it."""
    import zipfile

    with pytest.raises(ZeroDivisionError):
        with slicer.util.tryWithErrorDisplay("Failed."):
            1 / 0
    assert dialogs.shown == ["Failed.\n\ndivision by zero"]
    short, long = (slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTextNode", n) for n in ("short", "long"))
    short.SetText("x" * 255)
    long.SetText("é" * 256)
    assert slicer.util.saveScene(str(tmp_path / "study.mrb"))
    names = zipfile.ZipFile(tmp_path / "study.mrb").namelist()
    assert "study/study.mrml" in names and "study/Data/long.txt" in names and "study/Data/short.txt" not in names
    slicer.util.loadScene(str(tmp_path / "study.mrb"), {"clear": True})
    assert sorted(n.GetText() for n in slicer.util.getNodesByClass("vtkMRMLTextNode")) == ["x" * 255, "é" * 256]


# ---------------------------------------------------------------------------------- item 6: scans only
def test_only_true_scalar_volumes_are_offered_and_a_colour_volume_says_why(slicer, module):
    from RadFMModuleLib.scene_adapters import SlicerScene

    ct = add_ct(slicer)
    add = slicer.util.addVolumeFromArray
    rgb = add(np.zeros((2, 3, 4, 3), np.uint8), None, "Photo", "vtkMRMLVectorVolumeNode")
    add(np.zeros((2, 3, 4, 6), np.int16), None, "DWI", "vtkMRMLDiffusionWeightedVolumeNode")
    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLDiffusionTensorVolumeNode", "DTI")
    video = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLStreamingVolumeNode", "Video")
    frame = vtk.vtkImageData()
    frame.SetDimensions(4, 3, 1)
    frame.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    video.SetAndObserveImageData(frame)
    add(np.zeros(SHAPE, np.uint8), IJK_TO_RAS, "labels", "vtkMRMLLabelMapVolumeNode")
    scene = SlicerScene()
    items = {item.name: item for item in scene.volumes()}
    assert [n for n, i in items.items() if i.kind == "volume"] == ["CT"] and "labels" not in items
    assert {n: i.kind for n, i in items.items()} == {"CT": "volume", "Photo": "unsupported", "DWI": "unsupported",
                                                     "DTI": "unsupported", "Video": "unsupported"}
    assert "grey-scale" in items["Photo"].detail and "Vector to Scalar Volume" in items["Photo"].detail
    assert "streaming" in items["Video"].detail
    with pytest.raises(ValueError, match=r"Photo is a colour or vector volume \(.*\), not a scan RadFM can read"):
        scene.volume(rgb.GetID())
    assert scene.volume(ct.GetID()).array.shape == SHAPE

    widget = module.RadFMModuleWidget()
    try:
        box = widget.panel.volume_box
        assert [box.itemText(n) for n in range(box.count())] == ["CT"]
        assert "Not offered: Photo \u2014 a colour or vector volume (RadFM reads grey-scale" in \
            widget.panel.skipped_label.text()
    finally:
        widget.cleanup()


# ---------------------------------------------------------------------------------- items 7, 10: live scene, self-test
def test_module_self_test_runs_light_with_setup_and_cleanup(slicer, module, monkeypatch):
    """RadFMModuleTest.runTest: the widget follows added, moved and renamed regions; the end-to-end part stays off."""
    monkeypatch.delenv(module.END_TO_END_VARIABLE, raising=False)
    monkeypatch.setitem(sys.modules, "SampleData", None)  # no download on build machines
    test = module.RadFMModuleTest()
    test.runTest()
    widget = module.RadFMModuleWidget()
    widget.cleanup()  # observers gone: later scene changes reach no dead panel
    add_ct(slicer)
    slicer.mrmlScene.Clear(0)
    assert widget.Observations == [] and not widget._refresh.isActive()


def test_a_loading_scene_is_scanned_once_and_region_nodes_are_observed_while_in_it(slicer, module, qtbot,
                                                                                    monkeypatch):
    """Adding many nodes (a scene loading) scans the scene for regions not once per node on the GUI thread but
    once, at the debounced refresh; then every markups and segmentation node added is observed, a removed one no more."""
    widget = module.RadFMModuleWidget()
    try:
        scans, real_scan = [], slicer.util.getNodesByClass
        monkeypatch.setattr(slicer.util, "getNodesByClass", lambda cls, *args: scans.append(cls) or real_scan(cls, *args))
        nodes = [slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", f"Line {n}") for n in range(10)]
        nodes.append(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation"))
        assert scans == []  # nothing scanned while the nodes arrive
        watched = module.watched_events()

        def observed(node):
            events = next(events for cls, events in watched.items() if node.IsA(cls))
            return [node.HasObserver(event) for event in events]

        qtbot.waitUntil(lambda: all(all(observed(node)) for node in nodes))
        slicer.mrmlScene.RemoveNode(nodes[0])
        qtbot.waitUntil(lambda: not any(observed(nodes[0])))
        assert all(all(observed(node)) for node in nodes[1:])
    finally:
        widget.cleanup()


def test_renamed_scans_and_regions_are_listed_by_their_new_names(slicer, module, qtbot):
    """Renaming in Slicer (Data module, Segment Editor, Markups) shows in the panel's lists, as adding does;
    a volume that gets its voxels is offered then."""
    ct = add_ct(slicer)
    segmentation = add_segmentation(slicer, ct, {"s1": ("Lesion", np.ones(SHAPE, bool))}, "Segmentation")
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI 1")
    roi.SetSize(10.0, 10.0, 10.0)
    line = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "Line 1")
    line.AddControlPointWorld([0.0, 0.0, 0.0])
    line.AddControlPointWorld([0.0, 0.0, 10.0])
    later = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Arriving")
    widget = module.RadFMModuleWidget()
    panel = widget.panel

    def lists():
        return ([panel.volume_box.itemText(n) for n in range(panel.volume_box.count())],
                [panel.region_list.item(n).text() for n in range(panel.region_list.count())])

    try:
        qtbot.waitUntil(lambda: lists() == (["CT"], ["Lesion (segment)", "ROI 1 (ROI box)", "Line 1 (line, 10.0 mm)"]))
        ct.SetName("CT chest")  # each change alone: any refresh re-lists every name
        qtbot.waitUntil(lambda: lists()[0] == ["CT chest"], timeout=10000)
        slicer.util.updateVolumeFromArray(later, np.zeros(SHAPE, np.int16))
        qtbot.waitUntil(lambda: lists()[0] == ["CT chest", "Arriving"], timeout=10000)
        segmentation.GetSegmentation().GetSegment("s1").SetName("Nodule")
        qtbot.waitUntil(lambda: lists()[1][0] == "Nodule (segment)", timeout=10000)
        roi.SetName("Mediastinum")
        qtbot.waitUntil(lambda: lists()[1][1] == "Mediastinum (ROI box)", timeout=10000)
        line.SetName("Long axis")
        qtbot.waitUntil(lambda: lists()[1][2] == "Long axis (line, 10.0 mm)", timeout=10000)
    finally:
        widget.cleanup()


def test_light_self_test_needs_no_torch(tmp_path):
    """In a fresh Python where torch, SimpleITK, transformers and SampleData cannot be imported."""
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
        for name in ("torch", "SimpleITK", "transformers", "SampleData"):
            sys.modules[name] = None
        sys.path[:0] = [{str(PROJECT / "RadFMModule")!r}, {str(PROJECT / "Testing")!r}]
        import slicer_standin
        slicer_standin.start_slicer({str(tmp_path)!r})
        from RadFMModuleLib.qt_shim import QtCore, QtWidgets
        app = QtWidgets.QApplication([])
        QtCore.QSettings.setDefaultFormat(QtCore.QSettings.IniFormat)
        QtCore.QSettings.setPath(QtCore.QSettings.IniFormat, QtCore.QSettings.UserScope, {str(tmp_path)!r})
        import RadFMModule
        RadFMModule.RadFMModuleTest().runTest()
        print("light self-test passed")
    """)
    env = {k: v for k, v in os.environ.items() if k != "RADFM_SELFTEST_END_TO_END"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "light self-test passed" in out.stdout and "end-to-end self-test skipped" in out.stderr


# ---------------------------------------------------------------------------------- item 8: thumbnails with the scene
def test_thumbnails_survive_saving_and_reopening_the_scene(slicer, module, tmp_path, monkeypatch):
    import RadFMSlicer.ask

    monkeypatch.setattr(RadFMSlicer.ask.time, "strftime", lambda *args: "20260101-120000")  # two asks, one second
    ct = add_ct(slicer, "CT", 40)
    bright = add_ct(slicer, "CT bright", 900)
    logic = scripted_logic(module, [tokens("First."), tokens("Second.")], tmp_path)
    try:
        first = logic.ask("One?", volume=ct)
        second = logic.ask("Two?", volume=bright)
        pictures = [Path(t.images[0].preview_png) for t in (first, second)]
        saved = {t.question: p.read_bytes() for t, p in zip((first, second), pictures)}
    finally:
        logic.assistant.close()
    assert pictures[0].name != pictures[1].name  # named to the second, they overwrote each other
    assert saved["One?"] != saved["Two?"]
    assert not pictures[0].exists()  # the assistant that made them is closed: its folder is gone

    slicer.util.saveScene(str(tmp_path / "study.mrb"))
    slicer.mrmlScene.Clear(0)
    slicer.util.loadScene(str(tmp_path / "study.mrb"))
    widget = module.RadFMModuleWidget()
    try:
        turns = widget.logic.assistant.session.turns
        assert [Path(t.images[0].preview_png).read_bytes() for t in turns] == [saved["One?"], saved["Two?"]]
        assert all(not view.thumbs.isEmpty() for view in widget.panel.answers)  # "what the model saw" is shown
        folder = Path(turns[0].images[0].preview_png).parent
        slicer.mrmlScene.Clear(0)  # a new scene: its conversation is empty, the thumbnails go
        assert widget.logic.assistant.session.turns == [] and list(folder.iterdir()) == []
    finally:
        widget.cleanup()


# ---------------------------------------------------------------------------------- issue 16 item 3: corrupt session
def test_a_corrupt_conversation_is_kept_aside_and_the_panel_opens(slicer, module, tmp_path):
    from RadFMModuleLib.scene_adapters import SlicerScene

    broken = '{"format": 1, "turns": [{"task": "vqa", "question": "Q?", "images": [{"role": 3}]'  # cut short
    SlicerScene().save_session_json(broken)
    add_ct(slicer)
    widget = module.RadFMModuleWidget()
    try:
        assert "could not be read" in widget.panel.status_label.text()
        assert "RadFM conversation (unreadable, kept)" in widget.panel.status_label.text()
        logic = widget.logic
        logic.assistant.start_client = lambda python: ScriptedWorkerClient([tokens("Fine.")])
        logic.assistant.settings.checkpoint_folder, logic.assistant.settings.worker_python = str(tmp_path), sys.executable
        logic.ask("Anything?")
    finally:
        widget.cleanup()
    texts = {n.GetName(): n.GetText() for n in slicer.util.getNodesByClass("vtkMRMLTextNode")}
    assert texts["RadFM conversation (unreadable, kept)"] == broken  # not overwritten by the next turn
    assert json.loads(texts["RadFM conversation"])["turns"][0]["answer"] == "Fine."


# ---------------------------------------------------------------------------------- item 5: install once
@pytest.fixture
def installed(monkeypatch):
    from RadFMModuleLib import dependencies

    present = set()
    monkeypatch.setattr(dependencies, "_satisfied", lambda requirement: requirement in present)
    return present


def test_a_second_ask_during_the_install_starts_no_second_install(slicer, dialogs, module, installed, monkeypatch,
                                                                 tmp_path):
    """Slicer's pip_install processes Qt events: a click on Ask arriving then must be ignored."""
    from RadFMModuleLib import dependencies

    add_ct(slicer)
    widget = module.RadFMModuleWidget()
    panel = widget.panel
    pip_runs, asked_meanwhile = [], []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            installed.add(dependencies.TORCH)
            return types.ModuleType("torch")

    def pip_install(args, **kwargs):
        pip_runs.append(Path(args[1]).read_text())
        asked_meanwhile.append(panel.busy_now)
        panel.input.setPlainText("Again?")
        panel.ask("vqa")  # what a click delivered by processEvents() does
        installed.update(args[2:])

    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    panel.assistant.start_client = lambda python: ScriptedWorkerClient([tokens("Done.")])
    panel.folder_edit.setText(str(tmp_path))
    try:
        panel.input.setPlainText("Is there an effusion?")
        panel.ask("vqa")
        assert len(pip_runs) == 1 and asked_meanwhile == [True]
        assert len([q for q in dialogs.shown if "Install them now?" in q]) == 1
        assert f"torch=={importlib.metadata.version('torch')}" in pip_runs[0]  # PyTorchUtils' torch is kept
        assert panel.busy_now  # the first ask goes on to the worker
    finally:
        widget.cleanup()


def test_a_changed_package_already_in_use_asks_for_a_restart(slicer, dialogs, installed, monkeypatch):
    from RadFMModuleLib import dependencies
    from RadFMModuleLib.settings import ModelSettings

    installed.add(dependencies.TORCH)
    versions = [{"tqdm": "4.60.0", "numpy": "1.26.0"}, {"tqdm": "4.67.1", "numpy": "1.26.0"}]
    monkeypatch.setattr(dependencies, "installed_versions", lambda: versions.pop(0))
    monkeypatch.setattr(slicer.util, "pip_install", lambda args, **kw: installed.update(args[2:]))
    import tqdm  # noqa: F401  (imported in this session, as Slicer's own modules may have)

    assert not dependencies.ensure(ModelSettings(precision="float32"))
    assert "changed tqdm" in dialogs.shown[-1] and "Slicer must restart" in dialogs.shown[-1]
    assert dialogs.restarts == [True]


@pytest.mark.parametrize("python, message", [
    ("/nonexistent/bin/python", "does not exist"),
    (os.path.join(os.path.expanduser(os.environ.get("PYENV_ROOT", "~/.pyenv")), "versions", "3.9.18", "bin", "python"),
     "cannot import torch"),
])
def test_a_chosen_worker_python_is_checked_before_it_is_trusted(slicer, dialogs, python, message):
    from RadFMModuleLib import dependencies
    from RadFMModuleLib.settings import ModelSettings

    if message == "cannot import torch" and not os.path.isfile(python):
        pytest.skip(f"no Python without torch at {python}")
    lines = []
    assert not dependencies.ensure(ModelSettings(worker_python=python), log=lines.append)
    assert message in dialogs.shown[-1] and lines == [dialogs.shown[-1]]
    assert dependencies.ensure(ModelSettings(worker_python=sys.executable))


# ---------------------------------------------------------------------------------- selections in the parameter node
def test_selections_are_kept_in_the_parameter_node_and_shown_again(slicer, module, tmp_path):
    ct, prior = add_ct(slicer, "CT"), add_ct(slicer, "CT prior")
    slicer.util.setSliceViewerLayers(background=ct)
    segmentation = add_segmentation(slicer, ct, {"s1": ("Lesion", np.ones(SHAPE, bool))}, "S")
    widget = module.RadFMModuleWidget()
    try:
        panel = widget.panel
        for box, value in ((panel.prior_box, prior.GetID()), (panel.window_box, "lung")):
            box.setCurrentIndex(box.findData(value))
            box.activated.emit(box.currentIndex())  # as a click does
        panel.region_list.item(0).setCheckState(module.QtCore.Qt.Checked)
        node = widget.logic.getParameterNode()
        assert node.GetNodeReferenceID("Prior") == prior.GetID() and node.GetParameter("Window") == '"lung"'
        assert widget.logic.kept_selection().region_ids == (f"{segmentation.GetID()}/s1",)
    finally:
        widget.cleanup()
    reopened = module.RadFMModuleWidget()  # the module opened again on this scene
    try:
        selection = reopened.panel.selection()
        assert (selection.volume_id, selection.prior_id, selection.window) == (ct.GetID(), prior.GetID(), "lung")
        assert selection.region_ids == (f"{segmentation.GetID()}/s1",)
        assert slicer.util.saveScene(str(tmp_path / "study.mrb"))
        slicer.mrmlScene.Clear(0)  # a new scene: nothing kept
        assert reopened.logic.kept_selection() is None
        slicer.util.loadScene(str(tmp_path / "study.mrb"), {"clear": True})  # the study opened again
        names = {node.GetID(): node.GetName() for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")}
        selection = reopened.panel.selection()
        assert (names[selection.volume_id], names[selection.prior_id], selection.window) == ("CT", "CT prior", "lung")
        assert [reopened.panel.region_list.item(0).text()] == ["Lesion (segment)"]
        assert len(selection.region_ids) == 1
    finally:
        reopened.cleanup()


# ---------------------------------------------------------------------------------- a saved study added to an open one
def test_adding_a_saved_study_keeps_each_selection_whole_and_every_conversation(slicer, module, tmp_path):
    """File > Add Data of a saved .mrb imports it (loadScene's default, clear=False): MRML renames its ids.
    The kept selection then names the added study's scan and regions together; both conversations stay,
    the panel says which one it shows, and the other opens from the list."""
    from RadFMModuleLib.assistant import Selection

    def study(name):
        ct = add_ct(slicer, f"CT {name}")
        segmentation = add_segmentation(slicer, ct, {"s1": ("Lesion", np.ones(SHAPE, bool))}, f"Segments {name}")
        widget.logic.ask(f"About {name}?", volume=ct)
        widget.logic.keep_selection(Selection(ct.GetID(), None, (f"{segmentation.GetID()}/s1",), "lung"))

    widget = module.RadFMModuleWidget()
    scripts = [tokens("Old answer."), tokens("New answer."), tokens("Third answer.")]
    assistant = widget.logic.assistant
    assistant.start_client = lambda python: ScriptedWorkerClient(scripts)
    assistant.settings.checkpoint_folder, assistant.settings.worker_python = str(tmp_path), sys.executable
    try:
        study("2023")
        assert slicer.util.saveScene(str(tmp_path / "study-2023.mrb"))
        slicer.mrmlScene.Clear(0)
        study("2024")
        slicer.util.loadScene(str(tmp_path / "study-2023.mrb"))  # added to the open scene

        kept = widget.logic.kept_selection()
        scan = slicer.mrmlScene.GetNodeByID(kept.volume_id)
        ((segmentation_id, segment),) = [region.split("/") for region in kept.region_ids]
        assert (scan.GetName(), slicer.mrmlScene.GetNodeByID(segmentation_id).GetName(), segment) == (
            "CT 2023", "Segments 2023", "s1")  # one study, not the added scan with the open study's regions
        panel = widget.panel
        texts = sorted(json.loads(n.GetText())["turns"][0]["answer"] for n in slicer.util.getNodesByClass(
            "vtkMRMLTextNode") if n.GetAttribute("RadFM.Conversation"))
        assert texts == ["New answer.", "Old answer."]
        assert panel.conversations_row.isVisibleTo(panel) and panel.conversation_box.count() == 2
        shown = panel.conversation_box.currentText()
        assert panel.status_label.text() == (f"This scene holds 2 conversations; showing \u201c{shown}\u201d. "
                                             "Pick another under Conversation.")
        assert [t.answer for t in widget.logic.assistant.session.turns] == ["Old answer."]  # the added study's
        other = 1 - panel.conversation_box.currentIndex()
        panel.conversation_box.setCurrentIndex(other)
        panel.conversation_box.activated.emit(other)  # as a click does
        assert [t.answer for t in widget.logic.assistant.session.turns] == ["New answer."]
        assert [view.text for view in panel.answers] == ["New answer."]
        widget.logic.ask("Again?", volume=scan)  # goes to the conversation shown, the other is untouched
        texts = sorted(len(json.loads(n.GetText())["turns"]) for n in slicer.util.getNodesByClass(
            "vtkMRMLTextNode") if n.GetAttribute("RadFM.Conversation"))
        assert texts == [1, 2]
    finally:
        widget.cleanup()


# ---------------------------------------------------------------------------------- the GPU check offers what fits
def test_a_precision_too_big_for_the_gpu_is_met_with_an_offer_of_one_that_fits(slicer, module, monkeypatch, tmp_path):
    """The worker's memory check (quantization.check_device_memory, at the real model's size) names
    the tiers that fit; the panel offers the best of them and, taken, it is the saved precision."""
    import torch

    from bench.common import REAL_DIMS as dims
    from RadFMSlicer.errors import DeviceMemoryError
    from RadFMSlicer.quantization import GIB, check_device_memory, estimate_memory
    from RadFMSlicer.worker.client import WorkerError

    free = (estimate_memory(dims, "int8") + estimate_memory(dims, "bfloat16")) // 2  # int8 fits, bfloat16 not
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 24 * GIB))
    with pytest.raises(DeviceMemoryError) as raised:
        check_device_memory(dims, torch.device("cuda", 0), "bfloat16")

    class TooBig(ScriptedWorkerClient):
        def load(self, folder, **kwargs):
            raise WorkerError(str(raised.value))

    add_ct(slicer)
    widget = module.RadFMModuleWidget()
    panel = widget.panel
    try:
        panel.before_connect = None
        panel.assistant.start_client = lambda python: TooBig([])
        panel.folder_edit.setText(str(tmp_path))
        panel.precision_box.setCurrentText("bfloat16")
        panel.input.setPlainText("Any effusion?")
        panel.ask("vqa")
        deadline = time.monotonic() + 10
        while panel.busy_now and time.monotonic() < deadline:
            slicer.app.processEvents()
        assert "does not fit this GPU; int8 weights does" in panel.status_label.text()
        assert panel.offer_button.isVisibleTo(panel) and panel.offer_button.text() == "Use int8 weights"
        panel.offer_button.click()
        assert panel.assistant.settings.precision == "int8 weights" and not panel.offer_button.isVisibleTo(panel)
    finally:
        widget.cleanup()


# ---------------------------------------------------------------------------------- issue 12 item 6: where the model looked
def ask_in_panel(slicer, panel, question, tmp_path, scripts):
    panel.before_connect = None
    panel.assistant.start_client = lambda python: ScriptedWorkerClient(scripts)
    panel.folder_edit.setText(str(tmp_path))
    panel.input.setPlainText(question)
    panel.ask("vqa")
    deadline = time.monotonic() + 15
    while panel.busy_now and time.monotonic() < deadline:
        slicer.app.processEvents()
    return panel.answers[-1]


def test_show_attention_overlays_the_answers_map_on_the_scan(slicer, module, tmp_path):
    """Ticked, the answer carries a map and "Show attention" shows it as a heat-map volume on the
    scan's grid and geometry, in a heat map the scene has, 40 % over the scan in every slice view;
    a second answer's map updates the same overlay, which is never offered as a scan."""
    from RadFMModuleLib.scene_adapters import SlicerScene

    ct = add_ct(slicer)
    widget = module.RadFMModuleWidget()
    panel = widget.panel
    try:
        panel.attention_box.setChecked(True)
        view = ask_in_panel(slicer, panel, "Any nodule?", tmp_path, [tokens("No."), tokens("Still no.")])
        assert view.attention_button.isVisibleTo(panel)
        view.attention_button.click()
        (overlay,) = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if n is not ct]
        assert overlay.GetName() == "CT \u2014 resampler attention, not an explanation"
        assert panel.status_label.text() == f"Showing {overlay.GetName()}"
        heat = slicer.util.arrayFromVolume(overlay)
        assert heat.shape == SHAPE and heat.dtype == np.float32 and heat.max() == 1.0 and 0 < heat.mean() < 1
        matrix = slicer.util.vtkMatrixFromArray(np.eye(4))
        overlay.GetIJKToRASMatrix(matrix)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), IJK_TO_RAS)
        display = overlay.GetDisplayNode()
        # Inferno where Slicer's colour files are; here (slicer-core ships none) the built-in PET heat map
        assert display.GetColorNode().GetName() == "PET-Heat" and (display.GetLevel(), display.GetWindow()) == (0.5, 1)
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            assert (composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID()) == (ct.GetID(),
                                                                                             overlay.GetID())
            assert composite.GetForegroundOpacity() == 0.4
        assert [item.name for item in SlicerScene().volumes()] == ["CT"]

        second = ask_in_panel(slicer, panel, "Any effusion?", tmp_path, [])
        second.attention_button.click()
        assert len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")) == 2  # the one overlay, updated
    finally:
        widget.cleanup()


def test_unticked_no_map_is_computed_and_a_changed_scan_is_refused(slicer, module, tmp_path):
    from RadFMModuleLib.scene_adapters import SlicerScene

    ct = add_ct(slicer)
    widget = module.RadFMModuleWidget()
    panel = widget.panel
    try:
        view = ask_in_panel(slicer, panel, "Any nodule?", tmp_path, [tokens("No.")])
        assert "attention" not in panel.assistant.session.turns[-1].provenance
        assert not view.attention_button.isVisibleTo(panel)
        with pytest.raises(ValueError, match="not CT's any more"):
            SlicerScene().show_overlay(ct.GetID(), np.zeros((2, 2, 2), np.float32), "x")
    finally:
        widget.cleanup()


# ---------------------------------------------------------------------------------- the README's picture
# Remade only on request (RADFM_UPDATE_SCREENSHOTS=1), so a test run leaves the checkout as it was.
SCREENSHOT = PROJECT / "Resources" / "Screenshots" / "RadFMPanel.png"


def slice_view(slicer, layout_name, ras, size):
    """What Slicer's slice logic draws for a view (its layers blended) through ``ras``: RGBA and a QImage."""
    from RadFMModuleLib.qt_shim import QtGui

    logic = slicer.app.applicationLogic().GetSliceLogicByLayoutName(layout_name)
    logic.GetSliceNode().SetDimensions(size, size, 1)
    logic.FitSliceToBackground()
    logic.GetSliceNode().JumpSlice(*ras)  # the slice through the point, the whole scan in view
    producer = logic.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    width, height, _ = image.GetDimensions()
    rgba = vtk.util.numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, 4)
    rgba = np.ascontiguousarray(rgba[::-1])  # VTK's rows run bottom-up
    return rgba, QtGui.QImage(rgba.data, width, height, 4 * width, QtGui.QImage.Format_RGBA8888).copy()


def test_readme_screenshot_the_panel_beside_slicers_slice_views(slicer, module, qtbot, tmp_path):
    """The panel in the module beside the three slice views Slicer's own slice logics draw: the scan in
    the lung window and its marked region (the segment exported to a label map, outlined as Slicer does)."""
    import vtk.util.numpy_support  # noqa: F401 (slice_view)
    from panel_scene import IJK_TO_RAS as CHEST, NODULE, chest_phantom, nodule_mask, ras

    from RadFMModuleLib.qt_shim import QtCore, QtGui, QtWidgets

    ct = slicer.util.addVolumeFromArray(chest_phantom(nodule=True), CHEST, "CT chest 2024-03-01")
    slicer.util.addVolumeFromArray(chest_phantom(nodule=False), CHEST, "CT chest 2023-09-12")
    ct.GetDisplayNode().AutoWindowLevelOff()
    ct.GetDisplayNode().SetWindowLevel(1500.0, -600.0)
    segmentation = add_segmentation(slicer, ct, {"lesion": ("Lesion RUL", nodule_mask())}, "Segmentation")
    labels = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "Lesion RUL label")
    assert slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(segmentation, labels, ct)
    labels.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeLabels")
    slicer.util.setSliceViewerLayers(background=ct, label=labels, labelOpacity=1.0)
    for node in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
        node.SetUseLabelOutline(True)

    from RadFMModuleLib.settings import ModelSettings

    ModelSettings(checkpoint_folder=str(tmp_path), device="cpu", precision="float32").save(QtCore.QSettings())
    widget = module.RadFMModuleWidget()
    panel = widget.panel
    report = ("Findings: A 9 mm solid nodule in the right upper lobe, with smooth margins. No consolidation. "
              "No pleural effusion. Heart size is normal.\nImpression: Solitary right upper lobe nodule; "
              "compare with prior imaging and consider follow-up CT.")
    try:
        panel.history_edit.setText("67 y, male, former smoker, cough for 3 weeks")
        panel.window_box.setCurrentIndex(panel.window_box.findData("lung"))
        panel.region_list.item(0).setCheckState(QtCore.Qt.Checked)
        ask_in_panel(slicer, panel, "Is the marked lesion a solid nodule?", tmp_path, [
            tokens("Yes. There is a solid nodule in the right upper lobe; it has smooth margins and no cavitation."),
            tokens(report)])
        panel.region_list.item(0).setCheckState(QtCore.Qt.Unchecked)
        panel.ask("report")
        qtbot.waitUntil(lambda: not panel.busy_now, timeout=15000)
        assert [view.text[:4] for view in panel.answers] == ["Yes.", "Find"]

        nodule = ras((NODULE[2], NODULE[1], NODULE[0]))
        red, red_image = slice_view(slicer, "Red", nodule, 560)
        views = QtWidgets.QWidget()
        grid = QtWidgets.QGridLayout(views)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setSpacing(4)
        for (name, image), place in zip([("Red", red_image)] + [(n, slice_view(slicer, n, nodule, 278)[1])
                                                              for n in ("Yellow", "Green")],
                                        [(0, 0, 1, 2), (1, 0, 1, 1), (1, 1, 1, 1)]):
            label = QtWidgets.QLabel()
            label.setPixmap(QtGui.QPixmap.fromImage(image))
            grid.addWidget(label, *place)
        window = QtWidgets.QWidget()
        row = QtWidgets.QHBoxLayout(window)
        row.addWidget(views, 0, QtCore.Qt.AlignTop)
        widget.parent.setFixedSize(440, 842)
        row.addWidget(widget.parent)
        window.show()
        qtbot.waitExposed(window)
        outline = (red[..., 0] != red[..., 1]) | (red[..., 1] != red[..., 2])  # grey scan, coloured outline
        assert outline.any() and outline.mean() < 0.01  # the region is outlined, the scan is not covered
        shot = SCREENSHOT if os.environ.get("RADFM_UPDATE_SCREENSHOTS") == "1" else tmp_path / SCREENSHOT.name
        assert window.grab().save(str(shot)) and shot.stat().st_size > 10_000
    finally:
        widget.cleanup()
