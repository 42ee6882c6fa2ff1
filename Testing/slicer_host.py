"""Slicer's own MRML for tests outside Slicer: slicer-core, started as Slicer's application starts it.

PyPI ``slicer-core`` (5.12.4.0, Slicer 5.12) is Slicer's non-Qt half: MRML, the module
logics, storage nodes and ``slicer.util``. A bare ``vtkMRMLScene`` is not yet the scene a
module meets in Slicer; ``start()`` does what the application's start-up does to it
(``qSlicerCoreApplication::setMRMLScene`` and each core module's ``setup()``):

* the cache and data IO managers on the scene, then the application logic (its selection
  and interaction singletons);
* the colour logic, Slicer's ``vtkSlicerColorLogic``, with the colour files of
  ``<home>/share/ColorFiles`` (slicer-core ships none, so tables read from files, such as
  Inferno, exist only where a test gives them);
* the volumes, segmentations (its converter rules), markups, texts, transforms, subject
  hierarchy, data and reformat logics registered as modules, each observing the scene from now on;
* the Red, Yellow and Green slice logics, which make the slice and slice-composite nodes
  (one per layout name, axial, sagittal and coronal, as the layout manager's slice views do).

Nothing here imitates MRML; what slicer-core lacks (the Qt application, module widgets,
dialogs) is hand-written in ``slicer_standin``.
"""

from dataclasses import dataclass, field

import slicer
import vtk

# the slice views of Slicer's default (conventional) layout, and the orientation its layout gives each
SLICE_VIEWS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}

# module name -> its logic class, in the order Slicer's core modules are set up
MODULE_LOGICS = {
    "Volumes": slicer.vtkSlicerVolumesLogic,
    "Segmentations": slicer.vtkSlicerSegmentationsModuleLogic,
    "Markups": slicer.vtkSlicerMarkupsLogic,
    "Texts": slicer.vtkSlicerTextsLogic,
    "Transforms": slicer.vtkSlicerTransformLogic,
    "SubjectHierarchy": slicer.vtkSlicerSubjectHierarchyModuleLogic,
    "Data": slicer.vtkSlicerDataModuleLogic,
    "Reformat": slicer.vtkSlicerReformatLogic,  # the slice nodes' "Reformat" orientation
}


@dataclass
class Host:
    """The scene and what Slicer's start-up put around it; the logics live as long as the host."""

    scene: object
    application_logic: object
    logics: dict = field(default_factory=dict)  # module name -> logic ("Colors" included)
    slice_logics: object = None  # vtkCollection of vtkMRMLSliceLogic

    def stop(self):
        """As the application exits: the scene emptied, then every logic let go of it, last made first."""
        self.scene.Clear(1)
        for n in range(self.slice_logics.GetNumberOfItems()):
            self.slice_logics.GetItemAsObject(n).SetMRMLScene(None)
        for logic in reversed(list(self.logics.values())):
            logic.SetMRMLScene(None)
        self.application_logic.SetMRMLScene(None)


def _register(host: Host, name: str, logic):
    """As qSlicerCoreApplication does for each module: application logic first, then the scene."""
    logic.SetMRMLApplicationLogic(host.application_logic)
    logic.SetMRMLScene(host.scene)
    host.application_logic.SetModuleLogic(name, logic)
    host.logics[name] = logic
    return logic


def start(temporary_directory: str, home_directory: str = "") -> Host:
    """A new scene with Slicer's start-up done to it. ``temporary_directory``: the application's
    temporary path (the remote-data cache, unpacked ``.mrb`` files); ``home_directory``: where
    Slicer is installed, ``<home>/share/ColorFiles/`` holding its colour files (default: none)."""
    scene = slicer.vtkMRMLScene()
    cache = slicer.vtkCacheManager()  # what reading a scene's storage nodes goes through
    cache.SetRemoteCacheDirectory(temporary_directory)
    scene.SetCacheManager(cache)
    data_io = slicer.vtkDataIOManager()
    data_io.SetCacheManager(cache)
    scene.SetDataIOManager(data_io)
    application_logic = slicer.vtkSlicerApplicationLogic()
    application_logic.SetTemporaryPath(temporary_directory)
    application_logic.SetHomeDirectory(home_directory or temporary_directory)  # the colour logic reads
    application_logic.SetShareDirectory("share")  # <home>/share/ColorFiles
    application_logic.SetMRMLScene(scene)
    host = Host(scene, application_logic)
    colors = slicer.vtkSlicerColorLogic()
    application_logic.SetColorLogic(colors)
    _register(host, "Colors", colors)
    for name, logic_class in MODULE_LOGICS.items():
        _register(host, name, logic_class())
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)  # patient right is screen left
    host.slice_logics = vtk.vtkCollection()
    for layout_name, orientation in SLICE_VIEWS.items():
        slice_logic = slicer.vtkMRMLSliceLogic()
        slice_logic.SetMRMLApplicationLogic(application_logic)
        slice_logic.SetMRMLScene(scene)
        slice_node = slice_logic.AddSliceNode(layout_name)
        slice_node.SetDefaultOrientation(orientation)
        slice_node.SetOrientation(orientation)
        host.slice_logics.AddItem(slice_logic)
    application_logic.SetSliceLogics(host.slice_logics)
    return host
