"""A stand-in for the ``slicer`` calls the RadFM module makes, for tests outside Slicer.

Derived function by function from 3D Slicer 5.12.3 (``Base/Python/slicer/util.py``,
``ScriptedLoadableModule.py``, ``Libs/MRML/Core``; the functions used here are the same
in 5.8.1 and 5.10.0), so that what the real host does to the module happens here too:

* nodes and the scene are ``vtkObject`` subclasses, so observers are real VTK observers:
  the scene fires ``NodeAdded/NodeRemoved`` (with the node as call data),
  ``Start/EndClose`` and ``Start/EndImport``; markups fire their ``Point*`` events and
  segmentation nodes forward ``vtkSegmentation`` ``SegmentAdded/Removed/Modified``;
* class names and ``IsA`` follow MRML's hierarchy: vector, DWI, tensor and streaming
  volumes *are* ``vtkMRMLScalarVolumeNode``\\ s, as in Slicer;
* ``util.arrayFromVolume`` dispatches on the exact class name like Slicer's: a ``[k, j, i]``
  view for scalar and label maps, 4-D for vector volumes, ``[..., 3, 3]`` for tensors, and
  ``RuntimeError("Unsupported volume type")`` for anything else;
* ``util.arrayFromSegmentBinaryLabelmap`` exports through a temporary ``__temp__``
  label map node added to and removed from the scene (so scene observers see both) and
  returns that label map's int16 voxels (nearest-neighbour resampling stands in for the
  Segmentations logic's export);
* ``util.tryWithErrorDisplay`` shows the error and re-raises it;
* ``MRMLScene.Clear(0)`` keeps singleton nodes (parameter nodes) and resets them;
* ``util.saveScene`` / ``util.loadScene`` write and read a scene bundle (standing in for
  a ``.mrb``): text nodes of 256 characters or more go through a text storage node into a
  ``.txt`` file, as ``vtkMRMLTextNode`` does; only text and scripted-module nodes are
  saved (what the module stores in the scene).

Event ids of the scene's state events are not Slicer's numbers; code must use the names.
``install()`` puts a fresh scene in place and returns the ``sys.modules`` entries to register.
"""

import contextlib
import itertools
import json
import os
import sys
import types
import unittest
import zipfile

import numpy as np
import vtk
from vtk.util import numpy_support

TEXT_LENGTH_FOR_STORAGE_NODE = 256  # vtkMRMLTextNode: MAX_STRING_LENGTH_FOR_SAVE_WITHOUT_STORAGE_NODE


def vtk_matrix(array) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r, c in itertools.product(range(4), range(4)):
        matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def numpy_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _image(array: np.ndarray, components: int = 1) -> vtk.vtkImageData:
    """vtkImageData holding ``array`` ([k, j, i] or [k, j, i, c]) as its point scalars."""
    array = np.ascontiguousarray(array)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.reshape(-1, components) if components > 1 else array.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image


# ------------------------------------------------------------------------------------ nodes
class Node(vtk.vtkObject):
    """vtkMRMLNode: name, id, attributes, node references, singleton tag, hide-from-editors."""

    CLASSES = ("vtkMRMLNode",)  # this class first, then its MRML base classes

    def __init__(self, name=""):
        super().__init__()
        self.name, self.id, self.scene = name, None, None
        self.attributes, self.references = {}, {}
        self.singleton_tag, self.hide_from_editors, self.parent_transform = None, False, None

    def GetClassName(self):
        return self.CLASSES[0]

    def IsA(self, class_name):
        return class_name in self.CLASSES

    def GetName(self):
        return self.name

    def SetName(self, name):
        if name != self.name:
            self.name = name
            self.Modified()

    def GetID(self):
        return self.id

    def GetScene(self):
        return self.scene

    def GetAttribute(self, key):
        return self.attributes.get(key)

    def SetAttribute(self, key, value):
        self.attributes[key] = value

    def RemoveAttribute(self, key):
        self.attributes.pop(key, None)

    def GetAttributeNames(self):
        return list(self.attributes)

    def SetNodeReferenceID(self, role, node_id):
        if node_id:
            self.references[role] = node_id
        else:
            self.references.pop(role, None)
        self.Modified()

    def GetNodeReferenceID(self, role):
        return self.references.get(role)

    def GetNodeReference(self, role):
        node_id = self.references.get(role)
        return self.scene.GetNodeByID(node_id) if (self.scene and node_id) else None

    def SetSingletonTag(self, tag):
        self.singleton_tag = tag

    def GetSingletonTag(self):
        return self.singleton_tag

    def SetHideFromEditors(self, hide):
        self.hide_from_editors = bool(hide)

    def GetHideFromEditors(self):
        return int(self.hide_from_editors)

    def GetParentTransformNode(self):
        return self.parent_transform

    def Reset(self):
        """vtkMRMLNode::Reset (scene close, singletons): back to defaults, keeping id and singleton tag."""
        self.attributes, self.references = {}, {}


class LinearTransformNode(Node):
    CLASSES = ("vtkMRMLLinearTransformNode", "vtkMRMLTransformNode", "vtkMRMLNode")

    def __init__(self, name="", to_world=np.eye(4)):
        super().__init__(name)
        self.to_world = vtk_matrix(to_world)

    def IsTransformToWorldLinear(self):
        return True

    def GetMatrixTransformToWorld(self, matrix):
        matrix.DeepCopy(self.to_world)


class ScalarVolumeDisplayNode:
    """vtkMRMLScalarVolumeDisplayNode: window/level (automatic until set), colour node, Grey by default."""

    def __init__(self, center=0.0, width=0.0):
        self.center, self.width = center, width
        self.auto_window_level = True
        self.color_node_id = "vtkMRMLColorTableNodeGrey"

    def GetLevel(self):
        return self.center

    def GetWindow(self):
        return self.width

    def AutoWindowLevelOff(self):
        self.auto_window_level = False

    def GetAutoWindowLevel(self):
        return int(self.auto_window_level)

    def SetWindowLevelMinMax(self, minimum, maximum):
        self.width, self.center = maximum - minimum, (maximum + minimum) / 2

    def SetAndObserveColorNodeID(self, color_node_id):
        self.color_node_id = color_node_id

    def GetColorNodeID(self):
        return self.color_node_id


class ScalarVolumeNode(Node):
    CLASSES = ("vtkMRMLScalarVolumeNode", "vtkMRMLVolumeNode", "vtkMRMLNode")
    COMPONENTS = 1

    def __init__(self, name="", array_kji=None, ijk_to_ras=np.eye(4), window=None):
        super().__init__(name)
        self.image = None if array_kji is None else _image(array_kji, self.COMPONENTS)
        self.ijk_to_ras = vtk_matrix(ijk_to_ras)
        self.display = ScalarVolumeDisplayNode(*window) if window else None

    def GetImageData(self):
        return self.image

    def SetAndObserveImageData(self, image):
        self.image = image
        self.Modified()

    def GetIJKToRASMatrix(self, matrix):
        matrix.DeepCopy(self.ijk_to_ras)

    def SetIJKToRASMatrix(self, matrix):
        self.ijk_to_ras = vtk_matrix(numpy_matrix(matrix))

    def GetDisplayNode(self):
        return self.display

    def CreateDefaultDisplayNodes(self):
        """vtkMRMLScalarVolumeNode: a display node with the defaults, if there is none yet."""
        if self.display is None:
            self.display = ScalarVolumeDisplayNode()


class LabelMapVolumeNode(ScalarVolumeNode):
    CLASSES = ("vtkMRMLLabelMapVolumeNode",) + ScalarVolumeNode.CLASSES


class DiffusionWeightedVolumeNode(ScalarVolumeNode):
    CLASSES = ("vtkMRMLDiffusionWeightedVolumeNode",) + ScalarVolumeNode.CLASSES
    COMPONENTS = 6  # one component per gradient direction


class TensorVolumeNode(ScalarVolumeNode):
    CLASSES = ("vtkMRMLTensorVolumeNode",) + ScalarVolumeNode.CLASSES


class VectorVolumeNode(TensorVolumeNode):
    """A colour (RGB) or displacement volume: three components per voxel."""

    CLASSES = ("vtkMRMLVectorVolumeNode",) + TensorVolumeNode.CLASSES
    COMPONENTS = 3


class DiffusionTensorVolumeNode(TensorVolumeNode):
    CLASSES = ("vtkMRMLDiffusionTensorVolumeNode", "vtkMRMLDiffusionImageVolumeNode") + TensorVolumeNode.CLASSES

    def __init__(self, name="", tensors=None, ijk_to_ras=np.eye(4)):
        """``tensors``: [k, j, i, 3, 3]."""
        super().__init__(name, None, ijk_to_ras)
        if tensors is not None:
            tensors = np.ascontiguousarray(tensors, dtype=np.float32)
            self.image = vtk.vtkImageData()
            self.image.SetDimensions(tensors.shape[2], tensors.shape[1], tensors.shape[0])
            self.image.GetPointData().SetTensors(numpy_support.numpy_to_vtk(tensors.reshape(-1, 9), deep=True))


class StreamingVolumeNode(VectorVolumeNode):
    CLASSES = ("vtkMRMLStreamingVolumeNode",) + VectorVolumeNode.CLASSES


class Segmentation(vtk.vtkObject):
    """vtkSegmentation: segments by id; adding, removing and renaming fire its events."""

    SourceRepresentationModified = 62100
    RepresentationModified = 62101
    SegmentAdded = 62102
    SegmentRemoved = 62103
    SegmentModified = 62104

    def __init__(self):
        super().__init__()
        self.segments = {}

    def GetNumberOfSegments(self):
        return len(self.segments)

    def GetNthSegmentID(self, n):
        return list(self.segments)[n]

    def GetSegment(self, segment_id):
        return self.segments.get(segment_id)

    def add(self, segment_id, segment):
        segment.owner = self
        self.segments[segment_id] = segment
        self.InvokeEvent(self.SegmentAdded)

    def AddEmptySegment(self, segmentId="", segmentName="", color=None):
        segment_id = segmentId or f"Segment_{len(self.segments) + 1}"
        self.add(segment_id, Segment(segmentName or segment_id, np.zeros((1, 1, 1), bool)))
        return segment_id

    def RemoveSegment(self, segment_id):
        del self.segments[segment_id]
        self.InvokeEvent(self.SegmentRemoved)


class Segment:
    def __init__(self, name, mask_kji):
        self.name, self.mask, self.owner = name, np.asarray(mask_kji, dtype=bool), None

    def GetName(self):
        return self.name

    def SetName(self, name):
        self.name = name
        if self.owner is not None:
            self.owner.InvokeEvent(Segmentation.SegmentModified)


class SegmentationNode(Node):
    """Segments are binary labelmaps on the segmentation's own grid, as in Slicer. The node
    re-invokes its segmentation's segment events, as vtkMRMLSegmentationNode does."""

    CLASSES = ("vtkMRMLSegmentationNode", "vtkMRMLDisplayableNode", "vtkMRMLNode")

    def __init__(self, name="", ijk_to_ras=np.eye(4)):
        super().__init__(name)
        self.ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
        self.segmentation = Segmentation()
        for event in (Segmentation.SegmentAdded, Segmentation.SegmentRemoved, Segmentation.SegmentModified):
            self.segmentation.AddObserver(event, lambda caller, name, event=event: self.InvokeEvent(event))

    def add_segment(self, segment_id, name, mask_kji):
        self.segmentation.add(segment_id, Segment(name, mask_kji))

    def GetSegmentation(self):
        return self.segmentation


class MarkupsNode(Node):
    """vtkMRMLMarkupsNode's control points and their events."""

    CLASSES = ("vtkMRMLMarkupsNode", "vtkMRMLDisplayableNode", "vtkMRMLNode")
    LockModifiedEvent, LabelFormatModifiedEvent, PointAddedEvent, PointRemovedEvent = 19000, 19001, 19002, 19003
    PointPositionDefinedEvent, PointPositionUndefinedEvent = 19004, 19005
    PointPositionMissingEvent, PointPositionNonMissingEvent, PointModifiedEvent = 19006, 19007, 19008

    def __init__(self, name="", *points):
        super().__init__(name)
        self.points = []
        for point in points:
            self.AddControlPointWorld(point)

    def AddControlPointWorld(self, point):
        self.points.append(np.asarray(point, dtype=float))
        self.InvokeEvent(self.PointAddedEvent)
        self.InvokeEvent(self.PointPositionDefinedEvent)
        self.InvokeEvent(self.PointModifiedEvent)
        return len(self.points) - 1

    def SetNthControlPointPositionWorld(self, n, point):
        self.points[n] = np.asarray(point, dtype=float)
        self.InvokeEvent(self.PointModifiedEvent)

    def RemoveNthControlPoint(self, n):
        del self.points[n]
        self.InvokeEvent(self.PointRemovedEvent)
        self.InvokeEvent(self.PointModifiedEvent)

    def GetNumberOfDefinedControlPoints(self):
        return len(self.points)


class MarkupsROINode(MarkupsNode):
    CLASSES = ("vtkMRMLMarkupsROINode",) + MarkupsNode.CLASSES

    def __init__(self, name="", center=(0, 0, 0), size=(0, 0, 0), axes=np.eye(3)):
        """``axes``: columns are the ROI's x, y, z directions in RAS."""
        super().__init__(name)
        self.size = tuple(float(v) for v in size)
        object_to_world = np.eye(4)
        object_to_world[:3, :3], object_to_world[:3, 3] = axes, center
        self.object_to_world = vtk_matrix(object_to_world)

    def GetSize(self):
        return self.size

    def GetObjectToWorldMatrix(self):
        return self.object_to_world


class MarkupsLineNode(MarkupsNode):
    CLASSES = ("vtkMRMLMarkupsLineNode",) + MarkupsNode.CLASSES

    def GetLineLengthWorld(self):
        return float(np.linalg.norm(self.points[1] - self.points[0]))


class TextStorageNode(Node):
    CLASSES = ("vtkMRMLTextStorageNode", "vtkMRMLStorageNode", "vtkMRMLNode")


class TextNode(Node):
    """vtkMRMLTextNode: saved inline with the scene if short, through a storage node (a .txt file) if not."""

    CLASSES = ("vtkMRMLTextNode", "vtkMRMLStorableNode", "vtkMRMLNode")

    def __init__(self, name=""):
        super().__init__(name)
        self.text = ""

    def SetText(self, text, encoding=-1):
        if text != self.text:
            self.text = text
            self.Modified()

    def GetText(self):
        return self.text

    def needs_storage_node(self) -> bool:
        """vtkMRMLTextNode::GetDefaultStorageNodeClassName with ForceCreateStorageNode = Auto."""
        return len(self.text) >= TEXT_LENGTH_FOR_STORAGE_NODE


class ScriptedModuleNode(Node):
    """vtkMRMLScriptedModuleNode: string parameters (a module's parameter node)."""

    CLASSES = ("vtkMRMLScriptedModuleNode", "vtkMRMLNode")

    def __init__(self, name=""):
        super().__init__(name)
        self.parameters = {}

    def SetParameter(self, name, value):
        if self.parameters.get(name) != str(value):
            self.parameters[name] = str(value)
            self.Modified()

    def GetParameter(self, name):
        return self.parameters.get(name, "")

    def GetParameterNames(self):
        return list(self.parameters)

    def Reset(self):
        super().Reset()
        self.parameters = {}


class SliceCompositeNode(Node):
    CLASSES = ("vtkMRMLSliceCompositeNode", "vtkMRMLNode")

    def __init__(self, layout_name="Red", background_id=None):
        super().__init__(f"SliceComposite{layout_name}")
        self.layout_name, self.background_id = layout_name, background_id
        self.foreground_id, self.foreground_opacity = None, 0.0
        self.label_id, self.label_opacity = None, 1.0

    def GetLayoutName(self):
        return self.layout_name

    def GetBackgroundVolumeID(self):
        return self.background_id

    def SetBackgroundVolumeID(self, node_id):
        self.background_id = node_id

    def GetForegroundVolumeID(self):
        return self.foreground_id

    def SetForegroundVolumeID(self, node_id):
        self.foreground_id = node_id

    def GetForegroundOpacity(self):
        return self.foreground_opacity

    def SetForegroundOpacity(self, opacity):
        self.foreground_opacity = opacity

    def SetLabelVolumeID(self, node_id):
        self.label_id = node_id

    def SetLabelOpacity(self, opacity):
        self.label_opacity = opacity


NODE_CLASSES = {cls.CLASSES[0]: cls for cls in (
    LinearTransformNode, ScalarVolumeNode, LabelMapVolumeNode, DiffusionWeightedVolumeNode, TensorVolumeNode,
    VectorVolumeNode, DiffusionTensorVolumeNode, StreamingVolumeNode, SegmentationNode, MarkupsROINode,
    MarkupsLineNode, TextStorageNode, TextNode, ScriptedModuleNode, SliceCompositeNode)}


# ------------------------------------------------------------------------------------ scene
class MRMLScene(vtk.vtkObject):
    NodeAboutToBeAddedEvent, NodeAddedEvent, NodeAboutToBeRemovedEvent, NodeRemovedEvent = 0x2000, 0x2001, 0x2002, 0x2003
    StartCloseEvent, EndCloseEvent, StartImportEvent, EndImportEvent = 0x2102, 0x2202, 0x2104, 0x2204

    def __init__(self):
        super().__init__()
        self.nodes = {}
        self.ids = {}  # class name -> counter, as vtkMRMLScene::GenerateUniqueID

    def CreateNodeByClass(self, class_name):
        return NODE_CLASSES[class_name]()

    def AddNode(self, node):
        """Give the node a unique id ("<class><n>") and announce it, the call data being the node."""
        if node.singleton_tag:
            existing = self.GetSingletonNode(node.singleton_tag, node.GetClassName())
            if existing is not None:
                return existing
        self.InvokeEvent(self.NodeAboutToBeAddedEvent, node)
        count = self.ids[node.GetClassName()] = self.ids.get(node.GetClassName(), 0) + 1
        node.id, node.scene = f"{node.GetClassName()}{count}", self
        self.nodes[node.id] = node
        self.InvokeEvent(self.NodeAddedEvent, node)
        return node

    def AddNewNodeByClass(self, class_name, name=""):
        node = self.CreateNodeByClass(class_name)
        node.SetName(name)
        return self.AddNode(node)

    def RemoveNode(self, node):
        if node is None or node.id not in self.nodes:
            return
        self.InvokeEvent(self.NodeAboutToBeRemovedEvent, node)
        del self.nodes[node.id]
        node.scene = None
        self.InvokeEvent(self.NodeRemovedEvent, node)

    def GetNodeByID(self, node_id):
        return self.nodes.get(node_id)

    def GetNodesByClass(self, class_name) -> vtk.vtkCollection:
        collection = vtk.vtkCollection()
        for node in self.nodes.values():
            if node.IsA(class_name):
                collection.AddItem(node)
        return collection

    def GetNumberOfNodesByClass(self, class_name):
        return sum(node.IsA(class_name) for node in self.nodes.values())

    def GetNthNodeByClass(self, n, class_name):
        return [node for node in self.nodes.values() if node.IsA(class_name)][n]

    def GetSingletonNode(self, tag, class_name):
        return next((n for n in self.nodes.values() if n.singleton_tag == tag and n.IsA(class_name)), None)

    def GenerateUniqueName(self, name):
        taken = {node.GetName() for node in self.nodes.values()}
        return name if name not in taken else next(f"{name}_{n}" for n in itertools.count(1) if f"{name}_{n}" not in taken)

    def Clear(self, remove_singletons=0):
        """vtkMRMLScene::Clear: StartClose, remove nodes (singletons kept and reset unless asked), EndClose."""
        self.InvokeEvent(self.StartCloseEvent)
        for node in list(self.nodes.values()):
            if remove_singletons or not node.singleton_tag:
                self.RemoveNode(node)
        for node in self.nodes.values():
            node.Reset()
        self.InvokeEvent(self.EndCloseEvent)


# ------------------------------------------------------------------------------------ slicer.util
def _save_bundle(path):
    """Text and scripted-module nodes to a zip: ``scene.json`` plus one ``Data/*.txt`` per long text."""
    records = []
    with zipfile.ZipFile(path, "w") as bundle:
        for node in mrmlScene.nodes.values():
            if not isinstance(node, (TextNode, ScriptedModuleNode)):
                continue
            record = {"class": node.GetClassName(), "id": node.id, "name": node.name, "attributes": node.attributes,
                      "references": node.references, "singleton": node.singleton_tag,
                      "hide": node.hide_from_editors}
            if isinstance(node, ScriptedModuleNode):
                record["parameters"] = node.parameters
            elif node.needs_storage_node():
                record["file"] = f"Data/{node.id}.txt"
                bundle.writestr(record["file"], node.text.encode("utf-8"))
            else:
                record["text"] = node.text
            records.append(record)
        bundle.writestr("scene.json", json.dumps(records))


def _load_bundle(path):
    with zipfile.ZipFile(path) as bundle:
        records = json.loads(bundle.read("scene.json"))
        texts = {r["file"]: bundle.read(r["file"]).decode("utf-8") for r in records if "file" in r}
    mrmlScene.InvokeEvent(mrmlScene.StartImportEvent)
    for record in records:
        node = mrmlScene.CreateNodeByClass(record["class"])
        node.name, node.attributes, node.references = record["name"], record["attributes"], record["references"]
        node.singleton_tag, node.hide_from_editors = record["singleton"], record["hide"]
        if isinstance(node, ScriptedModuleNode):
            node.parameters = record["parameters"]
        else:
            node.text = texts[record["file"]] if "file" in record else record["text"]
        existing = mrmlScene.GetSingletonNode(node.singleton_tag, node.GetClassName()) if node.singleton_tag else None
        if existing is not None:  # an imported singleton updates the scene's own
            existing.attributes, existing.references = node.attributes, node.references
            existing.parameters = getattr(node, "parameters", {})
        else:
            mrmlScene.AddNode(node)
    mrmlScene.InvokeEvent(mrmlScene.EndImportEvent)


class VTKObservationMixin:
    """slicer.util.VTKObservationMixin: observers remembered per (object, event, method)."""

    def __init__(self):
        super().__init__()
        self.__observations = {}

    def addObserver(self, obj, event, method, group="none", priority=0.0):
        methods = self.__observations.setdefault(obj, {}).setdefault(event, {})
        if method in methods:
            return
        methods[method] = group, obj.AddObserver(event, method, priority), priority

    def removeObserver(self, obj, event, method):
        try:
            _group, tag, _priority = self.__observations[obj][event].pop(method)
            obj.RemoveObserver(tag)
        except KeyError:
            pass

    def removeObservers(self, method=None):
        for obj, events in self.__observations.items():
            for methods in events.values():
                for observed in list(methods):
                    if method is None or observed == method:
                        obj.RemoveObserver(methods.pop(observed)[1])
        if method is None:
            self.__observations.clear()

    def hasObserver(self, obj, event, method):
        return method in self.__observations.get(obj, {}).get(event, {})


class util:
    """The ``slicer.util`` functions the module calls. Dialogs answer with ``consent`` and
    record what they showed in ``shown``; ``pip_install`` records its arguments in ``installed``;
    ``restart`` records in ``restarts``."""

    consent, shown, installed, restarts = True, [], [], []
    VTKObservationMixin = VTKObservationMixin

    @staticmethod
    def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
        util.shown.append(text)
        return util.consent

    @staticmethod
    def confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs):
        util.shown.append(text)
        return util.consent

    @staticmethod
    def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
        util.shown.append(text)

    @staticmethod
    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        """Slicer 5.12.3: restores the cursor, shows ``message`` and the error (not in testing mode), re-raises."""
        try:
            if waitCursor:
                app.setOverrideCursor("wait")
            yield
            if waitCursor:
                app.restoreOverrideCursor()
        except Exception as exc:
            if waitCursor:
                app.restoreOverrideCursor()
            if show and not app.testingEnabled():
                util.errorDisplay(f"{message}\n\n{exc}" if message is not None else str(exc))
            raise

    @staticmethod
    def pip_install(requirements, **kwargs):
        util.installed.append(list(requirements) if isinstance(requirements, list) else requirements.split())

    @staticmethod
    def restart():
        util.restarts.append(True)

    @staticmethod
    def getNodesByClass(className, scene=None):
        """As Slicer's: traverse the scene's vtkCollection (every node that IsA the class)."""
        nodes = mrmlScene.GetNodesByClass(className)
        found = []
        nodes.InitTraversal()
        node = nodes.GetNextItemAsObject()
        while node:
            found.append(node)
            node = nodes.GetNextItemAsObject()
        return found

    @staticmethod
    def arrayFromVolume(volumeNode):
        """Slicer 5.12.3's dispatch on the exact class name, RuntimeError for any other class."""
        scalar_types = ["vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode"]
        vector_types = ["vtkMRMLVectorVolumeNode", "vtkMRMLMultiVolumeNode", "vtkMRMLDiffusionWeightedVolumeNode"]
        tensor_types = ["vtkMRMLDiffusionTensorVolumeNode"]
        image = volumeNode.GetImageData()
        shape = tuple(reversed(image.GetDimensions()))
        if volumeNode.GetClassName() in scalar_types:
            return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)
        if volumeNode.GetClassName() in vector_types:
            components = image.GetNumberOfScalarComponents()
            if components > 1:
                shape = shape + (components,)
            return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)
        if volumeNode.GetClassName() in tensor_types:
            return numpy_support.vtk_to_numpy(image.GetPointData().GetTensors()).reshape(shape + (3, 3))
        raise RuntimeError("Unsupported volume type: " + volumeNode.GetClassName())

    @staticmethod
    def updateVolumeFromArray(volumeNode, narray):
        """Slicer 5.12.3 for a 3-D scalar array: the node's image (made if missing) takes the
        array's shape and type, voxels deep-copied; ``long long`` refused."""
        if narray.ndim != 3:
            raise RuntimeError("Unsupported numpy array shape: " + str(narray.shape))
        image = volumeNode.GetImageData()
        if not image:
            image = vtk.vtkImageData()
            volumeNode.SetAndObserveImageData(image)
        vtype = numpy_support.get_vtk_array_type(narray.dtype)
        if vtype == vtk.VTK_LONG_LONG:
            raise RuntimeError("Unsupported numpy array type: long long")
        image.SetDimensions(tuple(reversed(narray.shape)))
        image.AllocateScalars(vtype, 1)
        util.arrayFromVolume(volumeNode)[:] = narray
        volumeNode.Modified()

    @staticmethod
    def setSliceViewerLayers(background="keep-current", foreground="keep-current", label="keep-current",
                             foregroundOpacity=None, labelOpacity=None, fit=False, rotateToVolumePlane=False):
        """Slicer 5.12.3: every slice composite node takes the given layers (a node or its id;
        "keep-current" leaves a layer alone) and opacities. ``fit`` and ``rotateToVolumePlane``
        need a layout manager, which there is none of here: ignored."""
        def node_id(node_or_id):
            return node_or_id.GetID() if isinstance(node_or_id, Node) else node_or_id

        for n in range(mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            viewer = mrmlScene.GetNthNodeByClass(n, "vtkMRMLSliceCompositeNode")
            if background != "keep-current":
                viewer.SetBackgroundVolumeID(node_id(background))
            if foreground != "keep-current":
                viewer.SetForegroundVolumeID(node_id(foreground))
            if foregroundOpacity is not None:
                viewer.SetForegroundOpacity(foregroundOpacity)
            if label != "keep-current":
                viewer.SetLabelVolumeID(node_id(label))
            if labelOpacity is not None:
                viewer.SetLabelOpacity(labelOpacity)

    @staticmethod
    def arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode=None):
        """Slicer 5.12.3: export into a temporary ``__temp__`` label map node, read it, remove the node."""
        if not referenceVolumeNode:
            raise RuntimeError("No reference volume is found in the input segmentationNode, therefore a valid "
                               "referenceVolumeNode input is required.")
        labelmap = mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__temp__")
        try:
            _export_segment(segmentationNode, segmentId, labelmap, referenceVolumeNode)
            return util.arrayFromVolume(labelmap)
        finally:
            mrmlScene.RemoveNode(labelmap)

    @staticmethod
    def saveScene(filename, properties={}):
        _save_bundle(filename)
        return True

    @staticmethod
    def loadVolume(filename, properties={}):
        """Read a scan file (SimpleITK stands in for Slicer's readers), add it and show it in the red
        view; RuntimeError for a file it cannot read, as Slicer's ``loadVolume``."""
        import SimpleITK as sitk

        try:
            image = sitk.ReadImage(str(filename))
        except RuntimeError:
            raise RuntimeError(f"Failed to load volume: {filename}") from None
        ijk_to_lps = np.eye(4)
        ijk_to_lps[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * np.array(image.GetSpacing())
        ijk_to_lps[:3, 3] = image.GetOrigin()
        name = os.path.basename(str(filename)).split(".")[0]
        node = mrmlScene.AddNode(ScalarVolumeNode(name, sitk.GetArrayFromImage(image),
                                                  np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps))
        util.setSliceViewerLayers(background=node)
        return node

    @staticmethod
    def loadScene(filename, properties={}):
        """Open a saved scene in place of the current one (File > Open scene)."""
        mrmlScene.Clear(0)
        _load_bundle(filename)


def _export_segment(segmentation_node, segment_id, labelmap, reference):
    """Stands in for ExportSegmentsToLabelmapNode: label 1 on the reference grid (int16), nearest neighbour."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise RuntimeError("Export of segment failed.")
    i, j, k = reference.GetImageData().GetDimensions()
    matrix = vtk.vtkMatrix4x4()
    reference.GetIJKToRASMatrix(matrix)
    kk, jj, ii = np.meshgrid(np.arange(k), np.arange(j), np.arange(i), indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)])
    si, sj, sk = np.rint(np.linalg.inv(segmentation_node.ijk_to_ras) @ numpy_matrix(matrix) @ ijk)[:3].astype(int)
    mask = segment.mask
    inside = (si >= 0) & (si < mask.shape[2]) & (sj >= 0) & (sj < mask.shape[1]) & (sk >= 0) & (sk < mask.shape[0])
    out = np.zeros(ii.size, dtype=np.int16)
    out[inside] = mask[sk[inside], sj[inside], si[inside]]
    labelmap.SetAndObserveImageData(_image(out.reshape(k, j, i)))
    labelmap.SetIJKToRASMatrix(matrix)


class _Application:
    """slicer.app: events are Qt's (when a Qt application exists), testing mode as set, cursor and restart recorded."""

    def __init__(self):
        self.testing, self.cursors = False, []

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
        util.restart()


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
            node = mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is not None:
                if node.GetAttribute("ModuleName") != self.moduleName:  # removed by a scene close: restore
                    node.SetAttribute("ModuleName", self.moduleName)
                return node
            return mrmlScene.AddNode(self.createParameterNode())

        def createParameterNode(self):
            node = mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(mrmlScene.GenerateUniqueName(self.moduleName))
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None):
            print(message)


mrmlScene = MRMLScene()
app = _Application()


def install() -> dict:
    """A fresh, empty scene; returns the ``sys.modules`` entries to register (``slicer`` and
    ``slicer.ScriptedLoadableModule``), e.g. with ``monkeypatch.setitem``."""
    global mrmlScene, app
    mrmlScene, app = MRMLScene(), _Application()
    util.consent, util.shown, util.installed, util.restarts = True, [], [], []
    this = sys.modules[__name__]
    for name, cls in NODE_CLASSES.items():  # slicer.vtkMRMLScalarVolumeNode etc., for their event ids
        setattr(this, name, cls)
    this.vtkMRMLMarkupsNode, this.vtkSegmentation, this.vtkMRMLScene = MarkupsNode, Segmentation, MRMLScene
    base_classes = types.ModuleType("slicer.ScriptedLoadableModule")
    base_classes.__dict__.update({k: v for k, v in vars(ScriptedLoadableModule).items() if not k.startswith("_")})
    return {"slicer": this, "slicer.ScriptedLoadableModule": base_classes}
