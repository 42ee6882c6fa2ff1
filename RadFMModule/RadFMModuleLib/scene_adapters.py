"""MRML nodes -> plain arrays and numbers: the only code that reads or writes Slicer's scene.

Geometry is always world RAS (a linear parent transform is applied), so a volume, its
segments, ROI boxes and lines all land in one coordinate system, the one the worker's
``ijk_to_ras`` and ``box_ras`` expect.
"""

import numpy as np
import slicer
import vtk

from .assistant import SceneItem, VolumeData

SESSION_ATTRIBUTE = "RadFM.Conversation"
SESSION_NODE_NAME = "RadFM conversation"


def _numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _node_to_world(node) -> np.ndarray:
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise ValueError(f"{node.GetName()} is under a non-linear transform: harden the transform first.")
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return _numpy(matrix)


def volume_data(node) -> VolumeData:
    """Voxels ``[k, j, i]`` (a view, no copy), IJK -> world RAS, and the window/level shown now."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    display = node.GetDisplayNode()
    window = (display.GetLevel(), display.GetWindow()) if display is not None else None
    return VolumeData(
        name=node.GetName(),
        array=slicer.util.arrayFromVolume(node),
        ijk_to_ras=_node_to_world(node) @ _numpy(ijk_to_ras),
        window=window,
        version=str(node.GetImageData().GetMTime()),
    )


def segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a boolean ``[k, j, i]`` mask on the volume's voxel grid."""
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)
    return np.asarray(mask) > 0


def roi_corners_ras(roi_node) -> np.ndarray:
    """The 8 corners (world RAS, shape ``[8, 3]``) of a possibly rotated ROI box."""
    half = np.asarray(roi_node.GetSize(), dtype=float) / 2
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float)
    corners = np.c_[signs * half, np.ones(8)]
    return (corners @ _numpy(roi_node.GetObjectToWorldMatrix()).T)[:, :3]


def roi_box_ras(roi_node) -> list:
    """``[[x0, y0, z0], [x1, y1, z1]]``: the axis-aligned RAS box around the ROI's corners."""
    corners = roi_corners_ras(roi_node)
    return [corners.min(axis=0).tolist(), corners.max(axis=0).tolist()]


def line_length_mm(line_node) -> float:
    return float(line_node.GetLineLengthWorld())


class SlicerScene:
    """The ``assistant.Scene`` protocol over ``slicer.mrmlScene``. Node ids identify items;
    a segment's id is ``"<segmentation node id>/<segment id>"``."""

    def volumes(self) -> list:
        nodes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
        return [SceneItem(n.GetID(), n.GetName(), "volume") for n in nodes if not n.IsA("vtkMRMLLabelMapVolumeNode")]

    def regions(self) -> list:
        items = []
        for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
            segmentation = node.GetSegmentation()
            for n in range(segmentation.GetNumberOfSegments()):
                segment_id = segmentation.GetNthSegmentID(n)
                name = segmentation.GetSegment(segment_id).GetName()
                items.append(SceneItem(f"{node.GetID()}/{segment_id}", name, "segment"))
        for node in slicer.util.getNodesByClass("vtkMRMLMarkupsROINode"):
            items.append(SceneItem(node.GetID(), node.GetName(), "box"))
        for node in slicer.util.getNodesByClass("vtkMRMLMarkupsLineNode"):
            if node.GetNumberOfDefinedControlPoints() == 2:
                items.append(SceneItem(node.GetID(), node.GetName(), "line", f"{line_length_mm(node):.1f} mm"))
        return items

    def shown_volume_id(self):
        """The background volume of the red slice view: what the radiologist is looking at."""
        for node in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            if node.GetLayoutName() == "Red":
                return node.GetBackgroundVolumeID()
        return None

    def volume(self, volume_id: str) -> VolumeData:
        return volume_data(self._node(volume_id))

    def segment_mask(self, segment_id: str, volume_id: str) -> np.ndarray:
        node_id, segment = segment_id.split("/", 1)
        return segment_mask(self._node(node_id), segment, self._node(volume_id))

    def box_ras(self, box_id: str) -> list:
        return roi_box_ras(self._node(box_id))

    def line_length_mm(self, line_id: str) -> float:
        return line_length_mm(self._node(line_id))

    def load_session_json(self):
        node = self._session_node()
        return (node.GetText() or None) if node is not None else None

    def save_session_json(self, text: str) -> None:
        node = self._session_node()
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTextNode", SESSION_NODE_NAME)
            node.SetAttribute(SESSION_ATTRIBUTE, "1")
        node.SetText(text)

    @staticmethod
    def _session_node():
        """The text node holding the conversation, so saving the scene saves it too."""
        for node in slicer.util.getNodesByClass("vtkMRMLTextNode"):
            if node.GetAttribute(SESSION_ATTRIBUTE):
                return node
        return None

    @staticmethod
    def _node(node_id: str):
        node = slicer.mrmlScene.GetNodeByID(node_id)
        if node is None:
            raise ValueError(f"{node_id} is no longer in the scene; pick it again.")
        return node
