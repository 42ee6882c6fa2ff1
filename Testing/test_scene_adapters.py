"""Scene adapters, MRML -> arrays and numbers, on Slicer's own MRML (slicer-core, started as the
application starts it: ``slicer_host``); nodes are made with the calls Slicer code uses.

The geometry checks are independent of the adapter code: markers are placed at known RAS
points, and must come out there after ``RadFMSlicer.imaging.volume_from_array`` (the path
the worker takes), in the right anatomical order.
"""

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "RadFMModule"))

from scripted_worker import ScriptedWorkerClient, tokens  # noqa: E402

# A sagittal acquisition: i runs anterior, j inferior, k toward patient left; anisotropic voxels.
DIRECTIONS = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)  # columns: i, j, k in RAS
SPACING = (0.9, 1.1, 2.0)
ORIGIN = (40.0, -20.0, 30.0)
SHAPE = (20, 24, 28)  # k, j, i
IJK_TO_RAS = np.eye(4)
IJK_TO_RAS[:3, :3], IJK_TO_RAS[:3, 3] = DIRECTIONS * SPACING, ORIGIN
LESION_IJK = (14, 12, 10)  # i, j, k
LESION_RADIUS_MM = 4.0


def to_ras(ijk, matrix=IJK_TO_RAS):
    return (matrix @ [*ijk, 1])[:3]


@pytest.fixture
def adapters(slicer):
    from RadFMModuleLib import scene_adapters

    return scene_adapters


def add_volume(slicer, array=None, window=(40.0, 400.0), matrix=IJK_TO_RAS, name="CT"):
    """A scan as scripts add one (``addVolumeFromArray``), its window set as a user sets it (centre, width)."""
    array = np.zeros(SHAPE, dtype=np.int16) if array is None else array
    node = slicer.util.addVolumeFromArray(array, matrix, name)
    if window:
        display = node.GetDisplayNode()
        display.AutoWindowLevelOff()
        display.SetWindowLevel(window[1], window[0])
    return node


def add_segment(slicer, segmentation, segment_id, name, mask, grid_matrix):
    """A segment painted on a grid of its own (a reference geometry volume, as the Segment Editor uses)."""
    grid = slicer.util.addVolumeFromArray(mask.astype(np.uint8), grid_matrix, "grid", "vtkMRMLLabelMapVolumeNode")
    if not segmentation.GetSegmentation().GetNumberOfSegments():
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(grid)
    segmentation.GetSegmentation().AddEmptySegment(segment_id, name)
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), segmentation, segment_id, grid)
    slicer.mrmlScene.RemoveNode(grid)


def add_lesion_segmentation(slicer):
    """A sphere around the lesion's RAS point, on the segmentation's own 1 mm axis-aligned grid."""
    center = to_ras(LESION_IJK)
    grid = np.eye(4)
    grid[:3, 3] = center - 10  # a 21 mm cube around the lesion
    k, j, i = np.indices((21, 21, 21))
    sphere = (i - 10) ** 2 + (j - 10) ** 2 + (k - 10) ** 2 <= LESION_RADIUS_MM ** 2
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    add_segment(slicer, node, "lesion", "Lesion", sphere, grid)
    return node


def add_roi(slicer, name, center, size, axes=np.eye(3)):
    """A placed ROI box; ``axes``: columns are its x, y, z directions in RAS."""
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = axes
    roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(object_to_node))
    roi.SetCenter(*center)
    roi.SetSize(*size)
    return roi


def add_line(slicer, name, *points):
    line = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", name)
    for point in points:
        line.AddControlPointWorld([float(v) for v in point])
    return line


# ---------------------------------------------------------------------------------- volumes
def test_volume_array_matrix_and_window_come_from_the_node(slicer, adapters):
    array = np.random.default_rng(0).integers(-1000, 1000, SHAPE).astype(np.int16)
    data = adapters.volume_data(add_volume(slicer, array, window=(-600.0, 1500.0)))
    np.testing.assert_array_equal(data.array, array)
    np.testing.assert_allclose(data.ijk_to_ras, IJK_TO_RAS)
    assert (data.name, data.window) == ("CT", (-600.0, 1500.0))
    no_display = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MR")
    slicer.util.updateVolumeFromArray(no_display, array)
    assert adapters.volume_data(no_display).window is None


def test_as_shown_is_the_automatic_window_slicer_computed(slicer, adapters):
    """A volume Slicer adds gets a display node whose window/level Slicer computes from the voxels:
    "as shown in the viewer" is that window, not a default."""
    array = np.random.default_rng(1).integers(-1000, 1000, SHAPE).astype(np.int16)
    node = slicer.util.addVolumeFromArray(array, IJK_TO_RAS, "CT")
    display = node.GetDisplayNode()
    assert display.GetAutoWindowLevel() and display.GetWindow() > 0
    assert adapters.volume_data(node).window == (display.GetLevel(), display.GetWindow())


def test_rotated_volume_lands_the_same_anatomy_after_volume_from_array(slicer, adapters):
    from RadFMSlicer.imaging import volume_from_array

    array = np.zeros(SHAPE, dtype=np.int16)
    markers = {100: (3, 4, 5), 200: (20, 18, 15)}  # value: (i, j, k)
    for value, (i, j, k) in markers.items():
        array[k, j, i] = value
    data = adapters.volume_data(add_volume(slicer, array))
    volume = volume_from_array(data.array, data.ijk_to_ras, name=data.name)

    found = {}
    for value, ijk in markers.items():
        (display_index,) = np.argwhere(volume.voxels == value)
        np.testing.assert_allclose(to_ras(display_index, volume.display_to_ras), to_ras(ijk), atol=1e-6)
        found[value] = display_index
    # Marker 200 is more anterior (i), more inferior (j) and more to the left (k) than marker 100:
    # display rows run anterior -> posterior, slices superior -> inferior, columns right -> left.
    (s1, r1, c1), (s2, r2, c2) = found[100], found[200]
    assert r2 < r1 and s2 > s1 and c2 > c1


def test_a_linear_parent_transform_is_applied(slicer, adapters):
    to_world = np.array([[0, -1, 0, 10], [1, 0, 0, -5], [0, 0, 1, 3], [0, 0, 0, 1]], dtype=float)
    node = add_volume(slicer)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Registration")
    slicer.util.updateTransformMatrixFromArray(transform, to_world)
    node.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(adapters.volume_data(node).ijk_to_ras, to_world @ IJK_TO_RAS)


# ---------------------------------------------------------------------------------- regions
def test_segment_mask_lands_on_the_lesion_of_the_volume_grid(slicer, adapters):
    from RadFMSlicer.imaging import volume_from_array

    volume_node = add_volume(slicer)
    mask = adapters.segment_mask(add_lesion_segmentation(slicer), "lesion", volume_node)
    assert mask.shape == SHAPE and mask.dtype == bool
    i, j, k = LESION_IJK
    assert mask[k, j, i]
    voxels = np.argwhere(mask)[:, ::-1]  # (i, j, k)
    distances = np.linalg.norm([to_ras(v) - to_ras(LESION_IJK) for v in voxels], axis=1)
    assert distances.max() <= LESION_RADIUS_MM + 0.5 * np.linalg.norm(SPACING)
    np.testing.assert_allclose(np.mean([to_ras(v) for v in voxels], axis=0), to_ras(LESION_IJK), atol=1.0)

    array = np.zeros(SHAPE, dtype=np.int16)
    array[k, j, i] = 500  # the lesion as the volume shows it
    data = adapters.volume_data(volume_node)
    volume = volume_from_array(array, data.ijk_to_ras)
    assert volume.to_display(mask)[volume.voxels == 500].all()  # mask and image agree in display space


def test_roi_box_follows_center_size_and_rotation(slicer, adapters):
    angle = math.radians(30)
    axes = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    center, size = np.array([10.0, 20.0, -5.0]), np.array([40.0, 20.0, 10.0])
    roi = add_roi(slicer, "ROI 1", center, size, axes)

    corners = adapters.roi_corners_ras(roi)
    in_roi_axes = (corners - center) @ axes  # each corner at +-size/2 along the ROI's own axes
    assert sorted(map(tuple, np.round(in_roi_axes, 9))) == sorted(
        (x, y, z) for x in (-20.0, 20.0) for y in (-10.0, 10.0) for z in (-5.0, 5.0))
    low, high = np.array(adapters.roi_box_ras(roi))
    half_extent = np.abs(axes) @ (size / 2)
    np.testing.assert_allclose(low, center - half_extent)
    np.testing.assert_allclose(high, center + half_extent)


def test_line_length_in_mm(slicer, adapters):
    line = add_line(slicer, "Line 1", (1, 2, 3), (4, 6, 15))
    assert adapters.line_length_mm(line) == 13.0


# ---------------------------------------------------------------------------------- the scene
def test_scene_lists_volumes_regions_and_the_shown_volume(slicer, adapters):
    ct = add_volume(slicer)
    slicer.util.addVolumeFromArray(np.zeros(SHAPE, np.uint8), IJK_TO_RAS, "labels", "vtkMRMLLabelMapVolumeNode")
    segmentation = add_lesion_segmentation(slicer)
    roi = add_roi(slicer, "ROI 1", (0, 0, 0), (10, 10, 10))
    line = add_line(slicer, "Line 1", (0, 0, 0), (0, 0, 23.4))
    add_line(slicer, "Being placed", (0, 0, 0))
    slicer.util.setSliceViewerLayers(background=ct)
    yellow = slicer.app.applicationLogic().GetSliceLogicByLayoutName("Yellow").GetSliceCompositeNode()
    yellow.SetBackgroundVolumeID(None)

    scene = adapters.SlicerScene()
    assert [(v.id, v.name) for v in scene.volumes()] == [(ct.GetID(), "CT")]  # no label maps
    assert [(r.id, r.name, r.kind, r.detail) for r in scene.regions()] == [
        (f"{segmentation.GetID()}/lesion", "Lesion", "segment", ""), (roi.GetID(), "ROI 1", "box", ""),
        (line.GetID(), "Line 1", "line", "23.4 mm")]
    assert scene.shown_volume_id() == ct.GetID()
    assert scene.segment_mask(f"{segmentation.GetID()}/lesion", ct.GetID()).sum() > 0
    with pytest.raises(ValueError, match="no longer in the scene"):
        scene.volume("vtkMRMLScalarVolumeNode99")


def test_conversation_is_kept_in_one_text_node(slicer, adapters):
    scene = adapters.SlicerScene()
    assert scene.load_session_json() is None
    scene.save_session_json('{"turns": []}')
    scene.save_session_json('{"turns": [1]}')
    (node,) = slicer.util.getNodesByClass("vtkMRMLTextNode")
    assert node.GetName() == "RadFM conversation" and node.GetText() == '{"turns": [1]}'
    assert scene.load_session_json() == '{"turns": [1]}'


# ---------------------------------------------------------------------------------- the Logic
def test_logic_asks_through_the_worker_and_saves_the_conversation(slicer, tmp_path):
    from RadFMModuleLib.settings import ModelSettings

    module = importlib.import_module("RadFMModule")
    array = np.full(SHAPE, -1000, dtype=np.int16)
    array[2:18, 3:21, 3:25] = 40
    ct = add_volume(slicer, array)
    slicer.util.setSliceViewerLayers(background=ct)
    segmentation = add_lesion_segmentation(slicer)
    line = add_line(slicer, "Line 1", (0, 0, 0), (0, 0, 23.4))
    scripts, clients = [tokens("No pleural effusion.")], []

    def start(python):
        clients.append(ScriptedWorkerClient(scripts))
        return clients[-1]

    logic = module.RadFMModuleLogic(start_client=start)
    logic.assistant.settings = ModelSettings(str(tmp_path), "cpu", "float32", worker_python=sys.executable)
    try:
        turn = logic.ask("Is there a pleural effusion?", regions=[f"{segmentation.GetID()}/lesion", line.GetID()],
                         window="lung", history="58 y, female")
    finally:
        logic.assistant.close()

    assert turn.answer == "No pleural effusion." and [i.role for i in turn.images] == ["current", "region"]
    sent = clients[0].asks[0]
    assert sent["history"] == "58 y, female; Measured: Line 1 23.4 mm" and sent["window"] == "lung"
    assert clients[0].loaded == {"folder": str(tmp_path), "device": "cpu", "dtype": "float32", "quantization": None}
    (node,) = [n for n in slicer.util.getNodesByClass("vtkMRMLTextNode") if n.GetName() == "RadFM conversation"]
    assert json.loads(node.GetText())["turns"][0]["answer"] == "No pleural effusion."


# ---------------------------------------------------------------------------------- what a scene holds mid-way
def test_a_volume_without_voxels_is_not_offered_and_asking_about_it_says_why(slicer, adapters, tmp_path):
    """A scalar volume node made but not filled yet (or whose data file did not load with its scene) is
    listed as not offered, with why; asking about it is a clear refusal, not a traceback."""
    module = importlib.import_module("RadFMModule")
    empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Being made")
    ct = add_volume(slicer)
    scene = adapters.SlicerScene()
    assert [(v.name, v.kind) for v in scene.volumes()] == [("Being made", "unsupported"), ("CT", "volume")]
    assert "without voxels" in scene.volumes()[0].detail
    with pytest.raises(ValueError, match="Being made is a volume without voxels .*: load its data again"):
        scene.volume(empty.GetID())
    logic = module.RadFMModuleLogic(start_client=lambda python: ScriptedWorkerClient([]))
    logic.assistant.settings.checkpoint_folder = str(tmp_path)
    try:
        with pytest.raises(ValueError, match="without voxels"):
            logic.ask("Anything?", volume=empty)
    finally:
        logic.assistant.close()
    assert scene.volume(ct.GetID()).array.shape == SHAPE


def test_an_roi_is_offered_once_placed_and_a_flat_box_is_refused(slicer, adapters):
    """An ROI being placed has no control point and no size: not a region yet. Placed but flat along
    one axis, it holds no voxels: asking about it says so instead of sending an empty box."""
    scene = adapters.SlicerScene()
    being_placed = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI 1")
    assert scene.regions() == []
    being_placed.SetCenter(0.0, 0.0, 0.0)
    being_placed.SetSize(20.0, 10.0, 0.0)  # placed, then squashed flat
    assert [(r.name, r.kind) for r in scene.regions()] == [("ROI 1", "box")]
    with pytest.raises(ValueError, match=r"ROI 1 has no depth \(20 x 10 x 0 mm\): drag its handles"):
        scene.box_ras(being_placed.GetID())
    being_placed.SetSize(20.0, 10.0, 5.0)
    assert scene.box_ras(being_placed.GetID()) == [[-10.0, -5.0, -2.5], [10.0, 5.0, 2.5]]
