"""The Qt half of Slicer that slicer-core lacks, hand-written for tests outside Slicer.

The scene, the logics, the storage nodes and ``slicer.util`` are Slicer's own
(``slicer_host`` starts them as the application does). What only exists in Slicer's Qt
application is imitated here, derived from Slicer 5.12.3, and nothing more:

* ``slicer.app``: events (Qt's, when a Qt application exists), testing mode, the cursor,
  ``restart`` (recorded), and ``coreIOManager()``, whose dispatch of ``loadNodes`` /
  ``saveNodes`` stands in for ``qSlicerCoreIOManager`` and its readers and writers, each a
  call into the real logics: volumes (``AddArchetypeVolume`` with the reader's options, then
  shown in the slice views), scenes (``.mrb``/``.mrml``, with ``clear`` as Slicer's scene
  readers take it), scene saving (``vtkMRMLScene.WriteToMRB``);
* ``slicer.modules.<name>.logic()``: the module handles, over the host's registered logics;
* ``slicer.ScriptedLoadableModule``'s base classes (Slicer's own file imports Qt and ctk);
* the dialogs ``slicer.util`` would show (``confirmOkCancelDisplay``, ``confirmYesNoDisplay``,
  ``errorDisplay``): answered with ``Dialogs.consent`` and recorded in ``Dialogs.shown``;
  ``pip_install`` and ``restart`` recorded (``Dialogs.installed``, ``Dialogs.restarts``);
* ``qt``, PythonQt's one flat namespace, made of PySide6's classes (Slicer's ``util`` imports it
  for the wait cursor). The module itself keeps using ``qt_shim``'s PySide6 side.

``start_slicer`` starts a host and puts it and these pieces in place (``slicer.mrmlScene``,
``slicer.app``, ..., and ``sys.modules`` entries).
"""

import os
import sys
import types
import unittest

import slicer
import vtk

# qSlicerVolumesReader's loading options, bit-coded as vtkSlicerVolumesLogic::AddArchetypeVolume takes them
VOLUME_OPTIONS = {"labelmap": 1, "center": 2, "singleFile": 4, "autoWindowLevel": 8, "discardOrientation": 16}


class Dialogs:
    """What the dialogs would have shown, how the user answers them, and what was installed."""

    def __init__(self):
        self.consent, self.shown, self.installed, self.restarts = True, [], [], []

    def confirm(self, text, windowTitle=None, parent=None, **kwargs):
        self.shown.append(text)
        return self.consent

    def error(self, text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
        self.shown.append(text)

    def pip_install(self, requirements, **kwargs):
        self.installed.append(list(requirements) if isinstance(requirements, list) else requirements.split())

    def restart(self):
        self.restarts.append(True)


class CoreIOManager:
    """qSlicerCoreIOManager's dispatch: a file type and properties to the reader or writer that handles them."""

    def __init__(self, host):
        self.host = host

    @staticmethod
    def fileType(filename):
        return "SceneFile" if str(filename).lower().endswith((".mrb", ".mrml")) else "VolumeFile"

    def loadNodes(self, fileType, properties, loadedNodes=None, userMessages=None):
        readers = {"VolumeFile": self._read_volume, "SceneFile": self._read_scene}
        if fileType not in readers:
            if userMessages is not None:
                userMessages.AddMessage(vtk.vtkCommand.ErrorEvent, f"No reader for {fileType}")
            return False
        return readers[fileType](dict(properties), loadedNodes, userMessages)

    def _read_volume(self, properties, loaded, messages):
        """qSlicerVolumesReader: the volumes logic reads the file; shown in the slice views unless show=False."""
        path = properties["fileName"]
        defaults = {"autoWindowLevel": True}
        options = sum(bit for key, bit in VOLUME_OPTIONS.items() if properties.get(key, defaults.get(key, False)))
        name = properties.get("name") or os.path.basename(path).split(".")[0]
        volumes = self.host.logics["Volumes"]
        node = volumes.AddArchetypeVolume(path, name, options, vtk.vtkStringArray(),
                                          messages if messages is not None else slicer.vtkMRMLMessageCollection())
        if node is None:
            return False
        if properties.get("show", True):
            selection = self.host.application_logic.GetSelectionNode()
            if properties.get("labelmap"):
                selection.SetActiveLabelVolumeID(node.GetID())
            else:
                selection.SetActiveVolumeID(node.GetID())
            self.host.application_logic.PropagateVolumeSelection(0)
        if loaded is not None:
            loaded.AddItem(node)
        return True

    def _read_scene(self, properties, loaded, messages):
        """qSlicerSceneBundleReader / qSlicerSceneReader: clear=True opens the scene, else it is imported."""
        path, clear = properties["fileName"], bool(properties.get("clear", False))
        scene = self.host.scene
        if path.lower().endswith(".mrb"):
            return bool(scene.ReadFromMRB(path, clear, messages))
        scene.SetURL(path)
        return bool(scene.Connect(messages) if clear else scene.Import(messages))

    def saveNodes(self, fileType, properties, userMessages=None):
        """qSlicerSceneWriter: a scene to ``.mrb`` (or ``.mrml``); storable nodes stay marked modified."""
        if fileType != "SceneFile":
            return False
        path, scene = os.path.abspath(properties["fileName"]), self.host.scene
        if path.lower().endswith(".mrb"):
            saved = scene.WriteToMRB(path, None, userMessages)
            scene.SetStorableNodesModifiedSinceRead()
            return bool(saved)
        scene.SetURL(path)
        scene.SetRootDirectory(os.path.dirname(path))
        return bool(scene.Commit())


class Application:
    """slicer.app: Qt events, testing mode, the cursor, restart, the IO manager, the application logic."""

    applicationName = "Slicer"

    def __init__(self, host, dialogs):
        self.host, self.dialogs = host, dialogs
        self.testing, self.cursors = False, []
        self._io = CoreIOManager(host)

    def processEvents(self):
        from RadFMModuleLib.qt_shim import QtWidgets

        if QtWidgets.QApplication.instance() is not None:
            QtWidgets.QApplication.processEvents()

    def testingEnabled(self):
        return self.testing

    def setOverrideCursor(self, cursor):
        self.cursors.append(cursor)

    def restoreOverrideCursor(self):
        self.cursors.pop()

    def restart(self):
        self.dialogs.restart()

    def coreIOManager(self):
        return self._io

    def applicationLogic(self):
        return self.host.application_logic

    def mrmlScene(self):
        return self.host.scene


def modules(host) -> types.SimpleNamespace:
    """slicer.modules: ``slicer.modules.segmentations.logic()`` and the like, over the host's logics."""
    return types.SimpleNamespace(**{name.lower(): types.SimpleNamespace(name=name, logic=lambda logic=logic: logic)
                                    for name, logic in host.logics.items()})


class ScriptedLoadableModule:
    """Base classes of ``slicer.ScriptedLoadableModule`` (5.12.3), without the developer section."""

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = self.__class__.__name__

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            """Without a parent, make one (Slicer's is a qMRMLWidget) with a vertical layout, run setup(), show it."""
            from RadFMModuleLib.qt_shim import QtWidgets

            super().__init__()
            self.moduleName = self.__class__.__name__[:-len("Widget")]
            self.developerMode = False
            self.parent = parent
            if parent is None:
                self.parent = QtWidgets.QWidget()
                self.parent.setLayout(QtWidgets.QVBoxLayout())
            self.layout = self.parent.layout()
            if parent is None:
                self.setup()
                self.parent.show()

        def setup(self):
            pass

        def cleanup(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__[:-len("Logic")]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is not None:
                if node.GetAttribute("ModuleName") != self.moduleName:  # removed by a scene close: restore
                    node.SetAttribute("ModuleName", self.moduleName)
                return node
            return slicer.mrmlScene.AddNode(self.createParameterNode())

        def createParameterNode(self):
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)  # CreateNodeByClass hands over a reference Python already holds
            node.SetSingletonTag(self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            node.SetAttribute("ModuleName", self.moduleName)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None):
            print(message)


def flat_qt() -> types.ModuleType:
    """PythonQt's ``qt``: every Qt class in one namespace (here PySide6's)."""
    from Qt import QtCore, QtGui, QtWidgets

    qt = types.ModuleType("qt")
    for part in (QtCore, QtGui, QtWidgets):
        qt.__dict__.update({k: v for k, v in vars(part).items() if k.startswith("Q")})
    return qt


def install(host, dialogs: Dialogs) -> tuple:
    """``(slicer attributes, slicer.util attributes, sys.modules entries)`` for a Slicer over ``host``."""
    from RadFMModuleLib import qt_shim  # first: with ``qt`` importable it would take PythonQt's side

    assert not qt_shim.IN_SLICER
    bases = types.ModuleType("slicer.ScriptedLoadableModule")
    bases.__dict__.update({k: v for k, v in vars(ScriptedLoadableModule).items() if not k.startswith("_")})
    app = Application(host, dialogs)
    on_slicer = {"mrmlScene": host.scene, "app": app, "modules": modules(host)}
    on_util = {"confirmOkCancelDisplay": dialogs.confirm, "confirmYesNoDisplay": dialogs.confirm,
               "errorDisplay": dialogs.error, "pip_install": dialogs.pip_install, "restart": dialogs.restart}
    return on_slicer, on_util, {"slicer.ScriptedLoadableModule": bases, "qt": flat_qt()}


def start_slicer(temporary_directory: str, set_attribute=setattr, set_module=sys.modules.__setitem__):
    """Slicer in place: a started ``slicer_host`` with this Qt side; returns the host.
    ``set_attribute(obj, name, value)`` and ``set_module(name, module)`` put each piece in place
    (pytest's monkeypatch, to undo them after a test)."""
    import slicer.util
    import slicer_host

    host = slicer_host.start(temporary_directory)
    on_slicer, on_util, modules = install(host, Dialogs())
    for name, value in on_slicer.items():
        set_attribute(slicer, name, value)
    for name, value in on_util.items():
        set_attribute(slicer.util, name, value)
    for name, module in modules.items():
        set_module(name, module)
    return host
