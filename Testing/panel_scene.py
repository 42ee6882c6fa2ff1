"""A chest CT scene in plain Python for the chat panel's tests (PySide6 and PythonQt alike).

``FakeScene`` follows the assistant's ``Scene`` protocol: a CT with a right upper lobe
nodule, a prior without it, a segment, an ROI box and a line; the conversation is kept
in ``saved``. Only numpy: it must import in a Python with no torch (Slicer's).
"""

import numpy as np

from RadFMModuleLib.assistant import SceneItem, VolumeData

# Stored like most CT series: i -> patient left, j -> posterior, k -> superior (LPS order in RAS).
IJK_TO_RAS = np.array([[-0.8, 0, 0, 32.0], [0, -0.8, 0, 40.0], [0, 0, 5.0, -30.0], [0, 0, 0, 1]])
SHAPE = (12, 80, 80)  # k, j, i
NODULE = (7, 30, 24)  # k, j, i: right upper lung (small i = patient right)


def chest_phantom(nodule: bool) -> np.ndarray:
    """Axial chest CT in HU: body, two lungs, spine, and (optionally) a solid nodule."""
    k, j, i = np.indices(SHAPE)
    ct = np.full(SHAPE, -1000, dtype=np.int16)
    ct[((i - 40) / 36) ** 2 + ((j - 40) / 28) ** 2 < 1] = 40
    for center in (24, 56):
        ct[((i - center) / 12) ** 2 + ((j - 36) / 18) ** 2 < 1] = -850
    ct[(i - 40) ** 2 + (j - 60) ** 2 < 25] = 700
    if nodule:
        ct[nodule_mask()] = 30
    return ct


def nodule_mask() -> np.ndarray:
    k, j, i = np.indices(SHAPE)
    return (i - NODULE[2]) ** 2 + (j - NODULE[1]) ** 2 + (5 * (k - NODULE[0])) ** 2 < 25


def ras(ijk) -> list:
    return (IJK_TO_RAS @ [*ijk, 1])[:3].tolist()


class FakeScene:
    """The assistant's Scene protocol in plain Python; the conversation is kept in ``saved``."""

    NAMES = {"ct": "CT chest 2024-03-01", "prior": "CT chest 2023-09-12"}
    ROI_IJK = ((48, 20, 3), (64, 40, 8))

    def __init__(self):
        self.arrays = {"ct": chest_phantom(nodule=True), "prior": chest_phantom(nodule=False)}
        self.saved = None
        self.set_aside = []  # conversations that could not be read, kept as they were
        self.previews = {}  # thumbnail file name -> PNG bytes, as the scene stores them
        self.overlays = {}  # scan id -> (map, name) of the heat map shown over it

    def volumes(self):
        return [SceneItem(key, name, "volume") for key, name in self.NAMES.items()]

    def regions(self):
        return [SceneItem("seg/lesion", "Lesion RUL", "segment"), SceneItem("roi1", "ROI 1", "box"),
                SceneItem("line1", "Line 1", "line", "23.4 mm")]

    def shown_volume_id(self):
        return "ct"

    def volume(self, volume_id):
        return VolumeData(self.NAMES[volume_id], self.arrays[volume_id], IJK_TO_RAS, (-600.0, 1500.0), "1")

    def segment_mask(self, segment_id, volume_id):
        return nodule_mask()

    def box_ras(self, box_id):
        corners = np.array([ras(ijk) for ijk in self.ROI_IJK])
        return [corners.min(0).tolist(), corners.max(0).tolist()]

    def line_length_mm(self, line_id):
        return 23.4

    conversation_id = "conversation"  # one conversation: the picker stays hidden

    def conversations(self):
        return [SceneItem(self.conversation_id, "RadFM conversation", "conversation")] if self.saved else []

    def load_session_json(self):
        return self.saved

    def save_session_json(self, text):
        self.saved = text

    def set_aside_session_json(self):
        self.set_aside.append(self.saved)
        self.saved = None
        return f"RadFM conversation (unreadable) {len(self.set_aside)}"

    def load_previews(self):
        return dict(self.previews)

    def save_previews(self, previews):
        self.previews = dict(previews)

    def show_overlay(self, scan_id, array, name):
        if array.shape != self.arrays[scan_id].shape:
            raise ValueError(f"The map's grid {array.shape} is not {self.NAMES[scan_id]}'s any more; ask again.")
        self.overlays[scan_id] = (array, name)
        return f"overlay/{scan_id}"
