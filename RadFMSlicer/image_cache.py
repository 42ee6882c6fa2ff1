"""What is kept per image between questions: scans and model images (the worker), image tokens (the engine).

A radiologist asks several questions about the scan on screen. The first question reads,
re-orients, windows and resamples it; a follow-up must not do any of that again.
:class:`ImageCache` knows a scan by where it came from (:func:`source_identity`: a file's
path, size and modification time; an array by the ``.npy`` file the viewer hands over once
per change of the volume, plus its geometry), and a model image by that plus its window
and interpolation. A changed file, a new hand-over or another window is another identity,
so it is made again.
"""

import os
from collections import OrderedDict

from .paths import split_npy_index


def source_identity(item) -> tuple | None:
    """What ``item`` (an :class:`~RadFMSlicer.ask.ImageInput`) will load, known without reading
    its voxels; None for an array in memory (only its pixels could tell) or a missing file
    (loading it says what is wrong)."""
    file = item.array_file if item.array is not None else item.path
    on_disk = None if file is None else split_npy_index(file)[0]  # one image of a RadFM .npy: scan.npy#2
    if on_disk is None or not os.path.exists(on_disk):
        return None
    geometry = None if item.ijk_to_ras is None else tuple(tuple(float(v) for v in row) for row in item.ijk_to_ras)
    return (os.path.abspath(file), _file_state(on_disk), item.series, geometry, item.name, item.modality,
            tuple(item.dicom_files or ()))


def _file_state(path) -> tuple:
    """(size, modification time) of a file; of every file under a folder (a DICOM series)."""
    if not os.path.isdir(path):
        state = os.stat(path)
        return state.st_size, state.st_mtime_ns
    found = []
    for root, _, files in os.walk(path):
        for name in files:
            state = os.stat(os.path.join(root, name))
            found.append((os.path.relpath(os.path.join(root, name), path), state.st_size, state.st_mtime_ns))
    return tuple(sorted(found))


class LRUCache:
    """The values of the most recently used keys (least recently used evicted first).

    The engine keeps image tokens in one; :class:`ImageCache` keeps scans and model
    images in them. Capacity 0 keeps nothing.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    @property
    def keeps(self) -> bool:
        """Whether anything put is kept (capacity 0: a value put is dropped at once)."""
        return self.capacity > 0

    def put(self, key, value) -> None:
        if not self.keeps:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class ImageCache:
    """Recent scans (``Volume``) and the model images made from them; capacity 0 keeps nothing."""

    def __init__(self, volumes: int = 2, images: int = 4):
        self.volumes = LRUCache(volumes)  # source identity -> Volume
        self.images = LRUCache(images)  # (source identity, window, interpolation) -> ModelImage
        self.previews = LRUCache(images)  # (image key, title) -> PNG bytes of its montage

    def load(self, request, item, device=None) -> tuple:
        """``(item.load(), request.model_image(item, volume, device))``, each the one made before if
        its source is unchanged; the source's identity is taken once (a DICOM folder: every file stat'ed),
        and not at all by a cache that keeps neither (nothing could be found again by it)."""
        identity = source_identity(item) if self.volumes.keeps or self.images.keeps else None
        volume = cached(self.volumes, identity, item.load)
        window = item.window if item.window is not None else request.window
        key = None if identity is None else (identity, repr(window), request.interpolation)
        return volume, cached(self.images, key, lambda: request.model_image(item, volume, device))

    def clear(self) -> None:
        for cache in (self.volumes, self.images, self.previews):
            cache.clear()


def cached(cache: LRUCache, key, make):
    """``cache``'s value for ``key``, else ``make()`` kept there (a None key: made, not kept)."""
    value = None if key is None else cache.get(key)
    if value is None:
        value = make()
        if key is not None:
            cache.put(key, value)
    return value


NO_CACHE = ImageCache(0, 0)  # a one-off question (the CLI): make everything, keep nothing
