"""A stand-in for the few ``slicer`` calls the RadFM module makes, for tests outside Slicer.

Not a mock library: nodes hold real VTK data (vtkImageData voxels, vtkMatrix4x4
geometry) and the functions do the geometry Slicer does for the calls the module uses:
``util.arrayFromVolume`` (a ``[k, j, i]`` view of the voxels), ``util.
arrayFromSegmentBinaryLabelmap`` (the segment resampled onto a reference volume's grid,
nearest neighbour), ROI object-to-world boxes, line lengths, text nodes. ``install()``
puts a fresh scene in place and registers this module as ``slicer`` (and
``slicer.ScriptedLoadableModule``) in ``sys.modules``.
"""

import contextlib
import itertools
import sys
import types

import numpy as np
import vtk
from vtk.util import numpy_support


def vtk_matrix(array) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r, c in itertools.product(range(4), range(4)):
        matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def numpy_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


class Node:
    CLASSES = ("vtkMRMLNode",)

    def __init__(self, name):
        self.name, self.id, self.attributes, self.parent_transform = name, None, {}, None

    def GetName(self):
        return self.name

    def GetID(self):
        return self.id

    def IsA(self, class_name):
        return class_name in self.CLASSES

    def GetAttribute(self, key):
        return self.attributes.get(key)

    def SetAttribute(self, key, value):
        self.attributes[key] = value

    def GetParentTransformNode(self):
        return self.parent_transform


class LinearTransformNode(Node):
    CLASSES = ("vtkMRMLLinearTransformNode", "vtkMRMLTransformNode")

    def __init__(self, name, to_world):
        super().__init__(name)
        self.to_world = vtk_matrix(to_world)

    def IsTransformToWorldLinear(self):
        return True

    def GetMatrixTransformToWorld(self, matrix):
        matrix.DeepCopy(self.to_world)


class ScalarVolumeDisplayNode:
    def __init__(self, center, width):
        self.center, self.width = center, width

    def GetLevel(self):
        return self.center

    def GetWindow(self):
        return self.width


class ScalarVolumeNode(Node):
    CLASSES = ("vtkMRMLScalarVolumeNode", "vtkMRMLVolumeNode")

    def __init__(self, name, array_kji, ijk_to_ras, window=None):
        super().__init__(name)
        array = np.ascontiguousarray(array_kji)
        self.image = vtk.vtkImageData()
        self.image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
        self.image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
        self.ijk_to_ras = vtk_matrix(ijk_to_ras)
        self.display = ScalarVolumeDisplayNode(*window) if window else None

    def GetImageData(self):
        return self.image

    def GetIJKToRASMatrix(self, matrix):
        matrix.DeepCopy(self.ijk_to_ras)

    def GetDisplayNode(self):
        return self.display


class LabelMapVolumeNode(ScalarVolumeNode):
    CLASSES = ("vtkMRMLLabelMapVolumeNode",) + ScalarVolumeNode.CLASSES


class Segment:
    def __init__(self, name, mask_kji):
        self.name, self.mask = name, np.asarray(mask_kji, dtype=bool)

    def GetName(self):
        return self.name


class Segmentation:
    def __init__(self):
        self.segments = {}

    def GetNumberOfSegments(self):
        return len(self.segments)

    def GetNthSegmentID(self, n):
        return list(self.segments)[n]

    def GetSegment(self, segment_id):
        return self.segments[segment_id]


class SegmentationNode(Node):
    """Segments are binary labelmaps on the segmentation's own grid, as in Slicer."""

    CLASSES = ("vtkMRMLSegmentationNode",)

    def __init__(self, name, ijk_to_ras):
        super().__init__(name)
        self.ijk_to_ras = np.asarray(ijk_to_ras, dtype=float)
        self.segmentation = Segmentation()

    def add_segment(self, segment_id, name, mask_kji):
        self.segmentation.segments[segment_id] = Segment(name, mask_kji)

    def GetSegmentation(self):
        return self.segmentation


class MarkupsROINode(Node):
    CLASSES = ("vtkMRMLMarkupsROINode", "vtkMRMLMarkupsNode")

    def __init__(self, name, center, size, axes=np.eye(3)):
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


class MarkupsLineNode(Node):
    CLASSES = ("vtkMRMLMarkupsLineNode", "vtkMRMLMarkupsNode")

    def __init__(self, name, *points):
        super().__init__(name)
        self.points = [np.asarray(p, dtype=float) for p in points]

    def GetNumberOfDefinedControlPoints(self):
        return len(self.points)

    def GetLineLengthWorld(self):
        return float(np.linalg.norm(self.points[1] - self.points[0]))


class TextNode(Node):
    CLASSES = ("vtkMRMLTextNode",)

    def __init__(self, name):
        super().__init__(name)
        self.text = ""

    def SetText(self, text):
        self.text = text

    def GetText(self):
        return self.text


class SliceCompositeNode(Node):
    CLASSES = ("vtkMRMLSliceCompositeNode",)

    def __init__(self, layout_name, background_id=None):
        super().__init__(f"SliceComposite{layout_name}")
        self.layout_name, self.background_id = layout_name, background_id

    def GetLayoutName(self):
        return self.layout_name

    def GetBackgroundVolumeID(self):
        return self.background_id


class MRMLScene:
    def __init__(self):
        self.nodes = {}
        self.counter = itertools.count(1)

    def AddNode(self, node):
        node.id = f"{node.CLASSES[0]}{next(self.counter)}"
        self.nodes[node.id] = node
        return node

    def AddNewNodeByClass(self, class_name, name):
        assert class_name == "vtkMRMLTextNode", f"the stand-in creates text nodes only, not {class_name}"
        return self.AddNode(TextNode(name))

    def GetNodeByID(self, node_id):
        return self.nodes.get(node_id)


class util:
    """The ``slicer.util`` functions the module calls. Dialogs answer with ``consent`` and
    record what they showed in ``shown``; ``pip_install`` records its arguments in ``installed``."""

    consent, shown, installed = True, [], []

    @staticmethod
    def confirmOkCancelDisplay(text, windowTitle=None):
        util.shown.append(text)
        return util.consent

    @staticmethod
    def errorDisplay(text, windowTitle=None):
        util.shown.append(text)

    @staticmethod
    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, waitCursor=False):
        try:
            yield
        except Exception as exc:  # Slicer shows the error and carries on
            util.shown.append(f"{message} {exc}")

    @staticmethod
    def pip_install(requirements):
        util.installed.append(list(requirements))

    @staticmethod
    def getNodesByClass(class_name):
        return [node for node in mrmlScene.nodes.values() if node.IsA(class_name)]

    @staticmethod
    def arrayFromVolume(node):
        image = node.GetImageData()
        i, j, k = image.GetDimensions()
        return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i)

    @staticmethod
    def arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, reference_volume_node):
        """The segment on the reference volume's grid: each reference voxel takes the nearest segment voxel."""
        mask = segmentation_node.GetSegmentation().GetSegment(segment_id).mask
        i, j, k = reference_volume_node.GetImageData().GetDimensions()
        reference = vtk.vtkMatrix4x4()
        reference_volume_node.GetIJKToRASMatrix(reference)
        kk, jj, ii = np.meshgrid(np.arange(k), np.arange(j), np.arange(i), indexing="ij")
        ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)])
        to_segment = np.linalg.inv(segmentation_node.ijk_to_ras) @ numpy_matrix(reference)
        si, sj, sk = np.rint(to_segment @ ijk)[:3].astype(int)
        inside = (si >= 0) & (si < mask.shape[2]) & (sj >= 0) & (sj < mask.shape[1]) & (sk >= 0) & (sk < mask.shape[0])
        out = np.zeros(ii.size, dtype=np.uint8)
        out[inside] = mask[sk[inside], sj[inside], si[inside]]
        return out.reshape(k, j, i)


class ScriptedLoadableModule:
    """Base classes of ``slicer.ScriptedLoadableModule``, enough to import a module file."""

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self):
            pass

    class ScriptedLoadableModuleTest:
        pass


mrmlScene = MRMLScene()


def install() -> dict:
    """A fresh, empty scene; returns the ``sys.modules`` entries to register (``slicer`` and
    ``slicer.ScriptedLoadableModule``), e.g. with ``monkeypatch.setitem``."""
    global mrmlScene
    mrmlScene = MRMLScene()
    util.consent, util.shown, util.installed = True, [], []
    base_classes = types.ModuleType("slicer.ScriptedLoadableModule")
    base_classes.__dict__.update({k: v for k, v in vars(ScriptedLoadableModule).items() if not k.startswith("_")})
    return {"slicer": sys.modules[__name__], "slicer.ScriptedLoadableModule": base_classes}
