"""MRML nodes -> plain arrays and numbers: the only code that reads or writes Slicer's scene.

Geometry is always world RAS (a linear parent transform is applied), so a volume, its
segments, ROI boxes and lines all land in one coordinate system, the one the worker's
``ijk_to_ras`` and ``box_ras`` expect.
"""

import base64
import json

import numpy as np
import slicer
import vtk

from .assistant import SceneItem, VolumeData

SESSION_ATTRIBUTE = "RadFM.Conversation"
SESSION_NODE_NAME = "RadFM conversation"
UNREADABLE_ATTRIBUTE = "RadFM.UnreadableConversation"
PREVIEWS_ATTRIBUTE = "RadFM.Previews"
PREVIEWS_NODE_NAME = "RadFM previews"
PREVIEWS_ROLE = "RadFMPreviews"  # conversation node -> its thumbnails' node
CONVERSATION_ROLE = "Conversation"  # parameter node -> the conversation shown
REGION_ROLE = "Region"  # parameter node -> each kept region's node
REGION_SEGMENTS_ATTRIBUTE = "RadFM.RegionSegments"  # beside them: each one's segment id ("" for a box or line)
SCAN_CLASS = "vtkMRMLScalarVolumeNode"
OVERLAY_ATTRIBUTE = "RadFM.AttentionOf"  # on an attention overlay: the id of its scan (no scan to ask about)
# The heat map's colours, the first the scene has: Inferno is one of Slicer's colour files (the colour
# logic names a file's table "vtkMRMLColorTableNodeFile" + its name), PET-Heat is built into the logic.
OVERLAY_COLOR_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLPETProceduralColorNodePET-Heat")
OVERLAY_OPACITY = 0.4
# A scalar volume node without an image: being made by a module, or its data file was not loaded with the scene.
NO_VOXELS = "a volume without voxels (still being made, or its data file was not loaded)"
# Classes that derive from vtkMRMLScalarVolumeNode but hold no single grey-scale 3D scan, and why
# they are not offered (most specific first: a streaming volume is also a vector volume).
NOT_A_SCAN = {
    "vtkMRMLLabelMapVolumeNode": None,  # a label map is a region, not a scan: not listed at all
    "vtkMRMLStreamingVolumeNode": "a streaming (video) volume",
    "vtkMRMLVectorVolumeNode": "a colour or vector volume (RadFM reads grey-scale CT/MR; "
                               "the Vector to Scalar Volume module makes one)",
    "vtkMRMLDiffusionWeightedVolumeNode": "a diffusion-weighted volume (one image per gradient)",
    "vtkMRMLTensorVolumeNode": "a tensor volume",
}


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
        dicom_files=_dicom_files(node),
    )


def _dicom_files(node) -> tuple:
    """The files of the DICOM instances a volume was loaded from (Slicer's DICOM module notes their UIDs)."""
    uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)
    if not uids or database is None:
        return ()
    files = tuple(database.fileForInstance(uid) for uid in uids)
    return files if all(files) else ()


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
    """``[[x0, y0, z0], [x1, y1, z1]]``: the axis-aligned RAS box around the ROI's corners.
    A box without depth along one of its axes (still being drawn, or squashed) holds no voxels: refused."""
    size = np.asarray(roi_node.GetSize(), dtype=float)
    if not (size > 0).all():
        raise ValueError(f"{roi_node.GetName()} has no depth ({' x '.join(f'{v:g}' for v in size)} mm): "
                         "drag its handles to give it a size in all three directions, or untick it.")
    corners = roi_corners_ras(roi_node)
    return [corners.min(axis=0).tolist(), corners.max(axis=0).tolist()]


def line_length_mm(line_node) -> float:
    return float(line_node.GetLineLengthWorld())


def _not_a_scan(node) -> "str | None":
    """None for a true scalar volume with voxels; else why it is no scan ("" for a label map)."""
    if node.GetClassName() != SCAN_CLASS:
        return next((reason or "" for cls, reason in NOT_A_SCAN.items() if node.IsA(cls)),
                    f"a {node.GetClassName()}")
    image = node.GetImageData()
    if image is None or 0 in image.GetDimensions() or image.GetPointData().GetScalars() is None:
        return NO_VOXELS
    return None


def _text_nodes(attribute: str) -> list:
    return [node for node in slicer.util.getNodesByClass("vtkMRMLTextNode") if node.GetAttribute(attribute)]


def _new_text_node(attribute: str, name: str):
    """A text node marked with ``attribute`` (the scene saves it; a long text as a file of the .mrb)."""
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTextNode", name)
    node.SetAttribute(attribute, "1")
    return node


def _answers(text: str) -> str:
    """How a conversation reads in a list: its number of answers."""
    try:
        count = len(json.loads(text or "{}").get("turns", []))
    except (ValueError, AttributeError, TypeError):
        return "unreadable"
    return f"{count} answer{'s' if count != 1 else ''}"


def store_regions(node, region_ids) -> None:
    """Keep region ids on a node as node references (MRML renames them with their nodes when a scene
    is imported) and the segment ids beside them; ids inside a string would go stale."""
    node.RemoveNodeReferenceIDs(REGION_ROLE)
    segments = []
    for region_id in region_ids:
        node_id, _, segment = region_id.partition("/")
        node.AddNodeReferenceID(REGION_ROLE, node_id)
        segments.append(segment)
    node.SetAttribute(REGION_SEGMENTS_ATTRIBUTE, json.dumps(segments))


def stored_regions(node) -> tuple:
    """The region ids ``store_regions`` kept, as the scene names them now."""
    try:
        segments = json.loads(node.GetAttribute(REGION_SEGMENTS_ATTRIBUTE) or "[]")
    except ValueError:
        return ()
    ids = [node.GetNthNodeReferenceID(REGION_ROLE, n) for n in range(node.GetNumberOfNodeReferences(REGION_ROLE))]
    if len(ids) != len(segments):
        return ()
    return tuple(f"{node_id}/{segment}" if segment else node_id for node_id, segment in zip(ids, segments))


class SlicerScene:
    """The ``assistant.Scene`` protocol over ``slicer.mrmlScene``. Node ids identify items;
    a segment's id is ``"<segmentation node id>/<segment id>"``.

    A scene can hold several conversations (each study added to it brings its own). The one
    shown and added to is ``conversation_id``: a node reference of ``parameter_node()`` when
    given (the module's, so the choice is saved with the scene and follows an import), else
    kept here; unset, it is the scene's first conversation.
    """

    def __init__(self, parameter_node=None):
        self._parameter_node = parameter_node
        self._conversation_id = None

    @property
    def conversation_id(self) -> "str | None":
        if self._parameter_node is None:
            return self._conversation_id
        return self._parameter_node().GetNodeReferenceID(CONVERSATION_ROLE)

    @conversation_id.setter
    def conversation_id(self, node_id: "str | None") -> None:
        if self._parameter_node is None:
            self._conversation_id = node_id
        else:
            self._parameter_node().SetNodeReferenceID(CONVERSATION_ROLE, node_id)

    def conversations(self) -> list:
        """Every conversation in the scene, as SceneItems whose detail is how many answers it holds."""
        return [SceneItem(node.GetID(), node.GetName(), "conversation", _answers(node.GetText()))
                for node in _text_nodes(SESSION_ATTRIBUTE)]

    def _conversation(self, create: bool = False):
        """The chosen conversation's node; unset or gone, the scene's first (or a new one if asked),
        which becomes the chosen one."""
        chosen = slicer.mrmlScene.GetNodeByID(self.conversation_id) if self.conversation_id else None
        if chosen is not None and chosen.GetAttribute(SESSION_ATTRIBUTE):
            return chosen
        node = next(iter(_text_nodes(SESSION_ATTRIBUTE)), None)
        if node is None and create:
            node = _new_text_node(SESSION_ATTRIBUTE, SESSION_NODE_NAME)
        self.conversation_id = node.GetID() if node is not None else None
        return node

    def _previews(self, create: bool = False):
        """The hidden text node of the chosen conversation's thumbnails (a node reference of it, so an
        imported study keeps its own); a scene saved before that has one unreferenced node."""
        conversation = self._conversation(create)
        if conversation is None:
            return None
        node = conversation.GetNodeReference(PREVIEWS_ROLE)
        if node is None:
            referenced = {c.GetNodeReferenceID(PREVIEWS_ROLE) for c in _text_nodes(SESSION_ATTRIBUTE)}
            node = next((n for n in _text_nodes(PREVIEWS_ATTRIBUTE) if n.GetID() not in referenced), None)
        if node is None and create:
            node = _new_text_node(PREVIEWS_ATTRIBUTE, PREVIEWS_NODE_NAME)
            node.SetHideFromEditors(True)
        if node is not None and create:
            conversation.SetNodeReferenceID(PREVIEWS_ROLE, node.GetID())
        return node

    def volumes(self) -> list:
        """Every volume but label maps: true scalar volumes as "volume", the rest as "unsupported"
        with the reason in ``detail`` (``getNodesByClass`` also returns the subclasses)."""
        items = []
        for node in slicer.util.getNodesByClass(SCAN_CLASS):
            reason = _not_a_scan(node)
            if node.GetAttribute(OVERLAY_ATTRIBUTE):
                continue  # our attention map: shown over its scan, not a scan itself
            if reason is None:
                items.append(SceneItem(node.GetID(), node.GetName(), "volume"))
            elif reason:
                items.append(SceneItem(node.GetID(), node.GetName(), "unsupported", reason))
        return items

    def regions(self) -> list:
        items = []
        for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
            segmentation = node.GetSegmentation()
            for n in range(segmentation.GetNumberOfSegments()):
                segment_id = segmentation.GetNthSegmentID(n)
                name = segmentation.GetSegment(segment_id).GetName()
                items.append(SceneItem(f"{node.GetID()}/{segment_id}", name, "segment"))
        for node in slicer.util.getNodesByClass("vtkMRMLMarkupsROINode"):
            if node.GetNumberOfDefinedControlPoints() > 0:  # placed: before its first click it is nowhere
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
        node = self._node(volume_id)
        reason = _not_a_scan(node)
        if reason is not None:
            raise ValueError(f"{node.GetName()} is {reason or 'a label map'}, not a scan RadFM can read."
                             if reason != NO_VOXELS else f"{node.GetName()} is {reason}: load its data again.")
        return volume_data(node)

    def segment_mask(self, segment_id: str, volume_id: str) -> np.ndarray:
        node_id, segment = segment_id.split("/", 1)
        return segment_mask(self._node(node_id), segment, self._node(volume_id))

    def box_ras(self, box_id: str) -> list:
        return roi_box_ras(self._node(box_id))

    def line_length_mm(self, line_id: str) -> float:
        return line_length_mm(self._node(line_id))

    def load_session_json(self):
        node = self._conversation()
        return (node.GetText() or None) if node is not None else None

    def save_session_json(self, text: str) -> None:
        self._conversation(create=True).SetText(text)

    def set_aside_session_json(self) -> str:
        """Keep an unreadable conversation as it is, under a name of its own, and choose a new, empty
        one, so the next saved turn overwrites neither it nor another study's; returns that name."""
        node = self._conversation()
        node.RemoveAttribute(SESSION_ATTRIBUTE)
        node.SetAttribute(UNREADABLE_ATTRIBUTE, "1")
        node.SetName(slicer.mrmlScene.GenerateUniqueName(f"{SESSION_NODE_NAME} (unreadable, kept)"))
        self.conversation_id = _new_text_node(SESSION_ATTRIBUTE, SESSION_NODE_NAME).GetID()
        return node.GetName()

    def load_previews(self) -> dict:
        """File name -> PNG bytes of the chosen conversation's thumbnails, saved with the scene."""
        node = self._previews()
        if node is None or not node.GetText():
            return {}
        try:
            return {name: base64.b64decode(data) for name, data in json.loads(node.GetText()).items()}
        except (ValueError, TypeError, AttributeError):  # damaged: thumbnails are lost, the conversation is not
            return {}

    def load_scan(self, path: str) -> str:
        """Load a scan file into the scene and show it (the Results tab); its volume node id.

        A file Slicer cannot read raises RuntimeError (``slicer.util.loadVolume``), which the tab shows.
        """
        return slicer.util.loadVolume(path).GetID()

    def show_overlay(self, scan_id: str, array: np.ndarray, name: str) -> str:
        """Show ``array`` (``[k, j, i]`` on the scan's grid, 0..1) as a heat map over the scan in
        every slice view; one overlay per scan, updated by the next answer's map. Its node id."""
        scan = self._node(scan_id)
        data = self.volume(scan_id)  # the scan's grid, and its IJK -> world with its transform hardened in
        if tuple(array.shape) != tuple(data.array.shape):
            raise ValueError(f"The map's grid {tuple(array.shape)} is not {scan.GetName()}'s any more "
                             "(the scan changed since the answer); ask again.")
        overlay = next((node for node in slicer.util.getNodesByClass(SCAN_CLASS)
                        if node.GetAttribute(OVERLAY_ATTRIBUTE) == scan_id), None)
        if overlay is None:
            overlay = slicer.mrmlScene.AddNewNodeByClass(SCAN_CLASS, name)
            overlay.SetAttribute(OVERLAY_ATTRIBUTE, scan_id)
            overlay.CreateDefaultDisplayNodes()
        overlay.SetName(name)
        ijk_to_ras = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                ijk_to_ras.SetElement(r, c, float(data.ijk_to_ras[r, c]))
        overlay.SetIJKToRASMatrix(ijk_to_ras)
        slicer.util.updateVolumeFromArray(overlay, np.asarray(array, np.float32))
        display = overlay.GetDisplayNode()
        display.SetAndObserveColorNodeID(next(
            (color for color in OVERLAY_COLOR_IDS if slicer.mrmlScene.GetNodeByID(color)), OVERLAY_COLOR_IDS[-1]))
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        slicer.util.setSliceViewerLayers(background=scan, foreground=overlay, foregroundOpacity=OVERLAY_OPACITY)
        return overlay.GetID()

    def import_dicom(self, path: str) -> bool:
        """Add a DICOM file (a report) to Slicer's DICOM database, so the DICOM browser lists it under its study."""
        import shutil
        import tempfile

        from DICOMLib import DICOMUtils

        with tempfile.TemporaryDirectory() as folder:  # importDicom takes a folder: only this file goes in
            shutil.copy(path, folder)
            DICOMUtils.importDicom(folder, copyFiles=True)
        return True

    def save_previews(self, previews: dict) -> None:
        """Thumbnails live in a hidden text node (long text is saved as a file in the .mrb)."""
        node = self._previews(create=bool(previews))
        if node is not None:
            node.SetText(json.dumps({name: base64.b64encode(data).decode("ascii") for name, data in previews.items()}))

    @staticmethod
    def _node(node_id: str):
        node = slicer.mrmlScene.GetNodeByID(node_id)
        if node is None:
            raise ValueError(f"{node_id} is no longer in the scene; pick it again.")
        return node
