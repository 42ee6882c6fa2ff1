"""From a request (scans, regions, task, question) to a prompt, model images and a session turn.

The CLI, the batch runner, the worker and the Slicer module all ask through here, so an
answer produced anywhere records the same provenance.
"""

import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from . import storage
from .errors import ImageError, PromptError, RequestError
from .generation import Generation, GenerationResult, GenerationSettings
from .image_cache import NO_CACHE, ImageCache
from .imaging import ModelImage, Volume, parse_window, preprocess
from .imaging.dicom_source import read_source
from .paths import FILE, check_kind, split_npy_index
from .preview import render_montage
from .prompts import ORDINALS, PromptImage, build_prompt, check_user_text, task_question
from .regions import check_corner, region_from_box, region_from_mask
from .session import REGION_NOTE, ImageRecord, Session, Turn

if TYPE_CHECKING:  # the engine brings torch: checking and preparing a request runs without it
    from .engine import RadFMEngine

ROLE_LABELS = {"current": "current study", "prior": "prior study"}


def _require(value, types: tuple, field: str, takes: str) -> None:
    """The door of the Python API: ``value`` is one of ``types`` (None means "may be left out"), or a
    RequestError naming ``field`` and what it takes, before anything deep inside trips over it."""
    allowed = tuple(type(None) if t is None else t for t in types)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise RequestError(f"{field} takes {takes}, got {type(value).__name__} {value!r:.60}")


_PATH = (str, os.PathLike)


def _check_fields(cls, item: dict, what: str) -> None:
    """A JSON object for ``cls`` names only its dataclass fields (a typo is an error, not ignored)."""
    unknown = set(item) - set(cls.__dataclass_fields__)
    if unknown:
        raise ImageError(f"unknown {what} field(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")


def _load_npy(path: str, what: str, mmap_mode=None) -> np.ndarray:
    """An array handed over as a ``.npy`` file; a cut or foreign file is an ImageError naming it."""
    if not Path(path).is_file():
        raise ImageError(f"{what} not found: {path}")
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # numpy: "mmap length is greater than file size", bad header
        raise ImageError(f"{what} {path} is truncated or not a .npy array ({exc})") from None


@dataclass
class ImageInput:
    """A scan: a file path, or an array ``[k, j, i]`` with its IJK->RAS matrix (from Slicer)."""

    path: str | None = None
    array: np.ndarray | None = None
    ijk_to_ras: list | None = None
    name: str | None = None
    role: str = "current"
    window: object = None  # overrides the request's window for this image
    series: str | None = None
    modality: str | None = None  # for an array ("CT", "MR"): picks the automatic window as a file's tag would
    array_file: str | None = None  # the .npy the array came in (set by from_json): names the scan cheaply
    dicom_files: list | None = None  # for an array: the DICOM files it was loaded from (Slicer's DICOM database)

    def __post_init__(self):
        _require(self.path, (*_PATH, None), "an image's path", "a file or folder path")
        for field in ("name", "series", "modality"):
            _require(getattr(self, field), (str, None), f"an image's {field}", "text")
        if self.role not in ROLE_LABELS:
            raise RequestError(f"an image's role takes {' or '.join(map(repr, ROLE_LABELS))}, got {self.role!r:.60}")

    @classmethod
    def from_json(cls, item: "str | dict") -> "ImageInput":
        """A path string, or ``{"path"| "array": file, "ijk_to_ras", "name", "role", "window"}``.

        Arrays travel as ``.npy`` files written by the caller, never inside JSON.
        """
        if isinstance(item, str):
            return cls(path=item)
        if not isinstance(item, dict):
            raise ImageError(f"an image must be a path or an object, got {item!r}")
        item = dict(item)
        array_file = item.pop("array", None)
        _require(array_file, (str, None), "an image's array", "the path of a .npy file (arrays never travel in JSON)")
        if array_file is not None:
            item["array"] = _load_npy(array_file, "array file", mmap_mode="r")
            item["array_file"] = array_file
            item.setdefault("name", Path(array_file).stem)
        _check_fields(cls, item, "image")
        return cls(**item)

    def load(self) -> Volume:
        from .imaging import load_volume, volume_from_array  # SimpleITK: imported to read, not to check a flag

        self._check_source()
        if self.array is not None:
            volume = volume_from_array(np.asarray(self.array), np.asarray(self.ijk_to_ras, float),
                                       name=self.name or "array", modality=self.modality)
            volume.dicom = read_source(self.dicom_files) if self.dicom_files else None
            return volume
        return load_volume(self.path, series=self.series)

    def check(self) -> None:
        """What can be checked without reading pixels: the source exists, the window is spelled right."""
        self._check_source()
        if self.array is None:
            check_kind(split_npy_index(self.path)[0], "scan")  # a FIFO or device would block the reader
        if self.array is None and not Path(split_npy_index(self.path)[0]).exists():
            raise ImageError(f"Scan not found: {self.path}")
        parse_window(self.window)

    def _check_source(self) -> None:
        """An array with its matrix, or a path."""
        if self.array is not None:
            if self.ijk_to_ras is None:
                raise ImageError(f"image {self.name or 'array'}: an array needs its ijk_to_ras matrix")
        elif not self.path:
            raise ImageError("an image needs a path or an array")


@dataclass
class RegionInput:
    """A marked region of image ``image``: a label mask (file or array) or a box (RAS or IJK).

    The prompt calls a region by its kind and place among the request's regions ("mask 1",
    "box 2"; :meth:`prompt_name`), so a case asked here or through a server gives the model the
    same words; ``name``, the reader's own (a Slicer segment's), labels its record and errors
    only, and never leaves the workstation.
    """

    name: str | None = None
    image: int = 0
    mask: "str | np.ndarray | None" = None
    label: int | None = None
    box_ras: list | None = None  # [[x0, y0, z0], [x1, y1, z1]]
    box_ijk: list | None = None  # [[i0, j0, k0], [i1, j1, k1]] of the original grid
    margin_mm: float = 10.0

    def __post_init__(self):
        _require(self.name, (str, None), "a region's name", "text")
        _require(self.mask, (*_PATH, np.ndarray, None), "a region's mask", "a label map path or a numpy array")
        for field in ("box_ras", "box_ijk"):
            _require(getattr(self, field), (list, tuple, np.ndarray, None), f"a region's {field}",
                     "two corners [[x0, y0, z0], [x1, y1, z1]]")
        _require(self.margin_mm, (int, float), "a region's margin_mm", "a number of mm")

    @classmethod
    def from_json(cls, item: dict) -> "RegionInput":
        if not isinstance(item, dict):
            raise ImageError(f"a region must be an object, got {item!r}")
        _check_fields(cls, item, "region")
        region = cls(**item)
        if isinstance(region.mask, str) and region.mask.endswith(".npy"):
            region.mask = _load_npy(region.mask, "region mask file")
        return region

    def prompt_name(self, number: int) -> str:
        """What the prompt calls the ``number``-th region (1-based) of a request."""
        return f"{'mask' if self.mask is not None else 'box'} {number}"

    def locate(self, volume: Volume, number: int):
        """The region on ``volume``, named as the prompt calls it."""
        name = self.prompt_name(number)
        if self.mask is not None:
            return region_from_mask(volume, self.mask, label=self.label, margin_mm=self.margin_mm, name=name)
        if self.box_ras is not None:
            return region_from_box(volume, self.box_ras[0], self.box_ras[1], margin_mm=self.margin_mm, name=name)
        if self.box_ijk is not None:
            return region_from_box(volume, ijk_min=self.box_ijk[0], ijk_max=self.box_ijk[1], margin_mm=self.margin_mm,
                                   name=name)
        raise ImageError(f"region {self._called(number)} needs a mask, box_ras or box_ijk")

    def _called(self, number: int) -> str:
        """The region in an error: the reader's name for it, else its number."""
        return repr(self.name) if self.name else str(number)

    def check(self, n_images: int, number: int) -> None:
        """What can be checked without the image: one kind of region, its numbers, its image."""
        called = self._called(number)
        given = [k for k in ("mask", "box_ras", "box_ijk") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ImageError(f"region {called} needs exactly one of mask, box_ras or box_ijk (got {given or 'none'})")
        if isinstance(self.image, bool) or not isinstance(self.image, int):
            raise ImageError(f"region {called}: 'image' is the index of its image (0 = the first), "
                             f"got {self.image!r}")
        if not 0 <= self.image < n_images:
            raise ImageError(f"region {called} refers to image {self.image + 1}, "
                             f"but {n_images} image(s) were given")
        if self.label is not None and (isinstance(self.label, bool) or not isinstance(self.label, int)):
            raise ImageError(f"region {called}: the label must be an integer, got {self.label!r}")
        box = self.box_ras if self.box_ras is not None else self.box_ijk
        if box is not None:
            if not isinstance(box, (list, tuple)) or len(box) != 2:
                raise ImageError(f"region {called}: a box is two corners [[x0, y0, z0], [x1, y1, z1]]")
            for corner, what in zip(box, ("first corner", "second corner")):
                check_corner(corner, what, self.name or self.prompt_name(number))
        if isinstance(self.mask, (str, Path)):
            check_kind(self.mask, f"region {called}: label map", FILE)
        if isinstance(self.mask, (str, Path)) and not Path(self.mask).is_file():
            raise ImageError(f"Label map not found: {self.mask}")


def generation_settings(fields: dict) -> GenerationSettings:
    """GenerationSettings from a front end's fields (``max_new_tokens``, ``temperature``, ...; None: the default)."""
    return GenerationSettings(**{k: fields[k] for k in GenerationSettings.__dataclass_fields__
                                 if fields.get(k) is not None})


@dataclass
class AskRequest:
    task: str = "vqa"
    question: str | None = None
    images: list[ImageInput] = field(default_factory=list)
    regions: list[RegionInput] = field(default_factory=list)
    history: str | None = None
    window: object = None  # None = automatic; a preset name, "center,width", Window or dict
    interpolation: str = "nearest"
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    include_previous_turns: bool = False
    preview_dir: str | None = None  # write a montage PNG per image here (thumbnails, audits)

    def __post_init__(self):
        for field in ("task", "interpolation"):
            _require(getattr(self, field), (str,), field, "text")
        for field in ("question", "history"):
            _require(getattr(self, field), (str, None), field, "text")
        for field, kind in (("images", ImageInput), ("regions", RegionInput)):
            items = getattr(self, field)
            _require(items, (list, tuple), field, f"a list of {kind.__name__} (AskRequest.from_dict also takes "
                                                  f"their JSON form)")
            for k, item in enumerate(items):
                _require(item, (kind,), f"{field}[{k}]", f"an {kind.__name__}")
        _require(self.settings, (GenerationSettings,), "settings",
                 "a GenerationSettings (AskRequest.from_dict takes its fields as keys: max_new_tokens, ...)")
        _require(self.include_previous_turns, (bool,), "include_previous_turns", "true or false")
        _require(self.preview_dir, (*_PATH, None), "preview_dir", "a folder path")

    @classmethod
    def keys(cls) -> set:
        """The keys :meth:`from_dict` reads: the request's fields, with the generation settings as keys of their own."""
        return set(cls.__dataclass_fields__) - {"settings"} | set(GenerationSettings.__dataclass_fields__)

    @classmethod
    def from_dict(cls, fields: dict) -> "AskRequest":
        """The one way front ends' fields become a request: CLI flags, a worker or HTTP line.

        The task defaults to vqa with a question, else report; generation settings come
        from their own keys (``max_new_tokens``, ``temperature``, ...); images and regions
        are objects already or their JSON form; a ``[center, width]`` window is allowed.
        A key it does not read (a typo) is refused, as is a field of the wrong type.
        """
        _require(fields, (dict,), "AskRequest.from_dict", "a dict of fields")
        unknown = set(fields) - cls.keys()
        if unknown:
            raise RequestError(f"unknown request field(s) {sorted(unknown)}; known: {sorted(cls.keys())}")
        for field in ("images", "regions"):
            _require(fields.get(field), (list, tuple, None), field, "a list of images (paths or objects)"
                     if field == "images" else "a list of regions (objects)")
        window = fields.get("window")
        return cls(
            task=fields.get("task") or ("vqa" if fields.get("question") else "report"),
            question=fields.get("question"),
            images=[i if isinstance(i, ImageInput) else ImageInput.from_json(i) for i in fields.get("images") or []],
            regions=[r if isinstance(r, RegionInput) else RegionInput.from_json(r) for r in fields.get("regions") or []],
            history=fields.get("history"),
            window=",".join(str(v) for v in window) if isinstance(window, (list, tuple)) else window,
            interpolation=fields.get("interpolation") or "nearest",
            settings=generation_settings(fields),
            include_previous_turns=fields.get("include_previous_turns") or False,
            preview_dir=fields.get("preview_dir"),
        )

    def model_image(self, item: ImageInput, volume: Volume, device=None) -> ModelImage:
        """``item``'s scan as the model sees it: its own window, else the request's."""
        window = item.window if item.window is not None else self.window
        return preprocess(volume, window, interpolation=self.interpolation, device=device)


@dataclass
class PreparedAsk:
    """Everything the model will be given, before generation starts."""

    question: str
    prompt: str
    model_images: list[ModelImage]
    records: list[ImageRecord]
    tokens_per_image: int = 32  # the prompt's image tags are this long: the model's latents
    edges: list = field(default_factory=list)  # per model image: patient directions at its edges (previews)
    volumes: list[Volume] = field(default_factory=list)  # per request image: its scan (an attention map's grid)


def validate(request: AskRequest) -> str:
    """Every check that needs neither the model nor the pixels; raises the first problem found.

    Task and question, window spellings, that each image exists, each region's kind,
    numbers and image, and that the preview folder can be written. Front ends (CLI,
    batch, eval, worker) call it before loading the model, so a typo costs no load;
    :func:`prepare` calls it too, and uses the question it returns (the task's wording).
    """
    _require(request, (AskRequest,), "the request", "an AskRequest (AskRequest.from_dict(fields) builds one)")
    if not request.images:
        raise ImageError("no image given: RadFM answers about an image (--image PATH)")
    if len(request.images) + len(request.regions) > len(ORDINALS):
        raise PromptError(f"at most {len(ORDINALS)} images and regions per question")
    question = task_question(request.task, request.question)
    if request.history is not None:
        check_user_text(request.history, "the clinical history")
    parse_window(request.window)
    for item in request.images:
        item.check()
    for number, region in enumerate(request.regions, 1):
        region.check(len(request.images), number)
    if request.preview_dir:
        storage.check_writable(request.preview_dir, "preview folder", folder=True)
    return question


def prepare(request: AskRequest, session: Session | None = None, tokens_per_image: int = 32,
            images: ImageCache = NO_CACHE, device=None) -> PreparedAsk:
    """Load, reorient, window and resample every image and region (on ``device``); write the prompt.

    ``images``: what a long-lived caller (the worker) keeps between questions, so that a
    follow-up about an unchanged scan reads and preprocesses nothing again.
    """
    question = validate(request)
    volumes, model_images, records, labels, edges = [], [], [], [], []
    for k, item in enumerate(request.images):
        volume, image = images.load(request, item, device)
        label = ROLE_LABELS.get(item.role, item.role)
        volumes.append(volume)
        model_images.append(image)
        edges.append(_edges(volume))
        labels.append(PromptImage(label))
        records.append(_record(image, volume, item.role, item.name or Path(image.source).name, None))
    for number, region_input in enumerate(request.regions, 1):
        region = region_input.locate(volumes[region_input.image], number)
        parent = model_images[region_input.image]
        image = preprocess(region.volume, parent.window, interpolation=request.interpolation, device=device)
        facts = region.facts(ORDINALS[len(labels)])
        model_images.append(image)
        edges.append(edges[region_input.image])  # a crop keeps its image's orientation
        labels.append(PromptImage(f'marked region "{region.name}"', facts))
        records.append(_record(image, region.volume, "region", region_input.name or region.name, facts,
                               region.describe()))
    previous = session.previous_turns() if (session and request.include_previous_turns) else None
    # The user's own words: build_prompt applies the task template itself (once).
    prompt = build_prompt(request.task, labels, request.question, request.history, previous, tokens_per_image)
    if request.preview_dir:
        _write_previews(model_images, records, edges, Path(request.preview_dir), images)
    return PreparedAsk(question, prompt, model_images, records, tokens_per_image, edges, volumes)


def _edges(volume: Volume) -> tuple:
    """Patient directions at a preview's edges; a PNG/JPEG has no geometry, only the left-is-right convention."""
    left, right, top, bottom = volume.edge_letters()
    if volume.source.lower().endswith((".png", ".jpg", ".jpeg")):
        return left, right, None, None
    return left, right, top, bottom


def _record(image: ModelImage, volume: Volume, role: str, label: str, facts: str | None,
            region: str | None = None) -> ImageRecord:
    info = image.to_dict()
    if region:
        info["notes"] = info["notes"] + [f"{REGION_NOTE}{region}"]
    dicom = volume.dicom.record(volume.display_to_ras, volume.shape) if volume.dicom else None
    return ImageRecord(role=role, label=label, source=image.source, shape=info["tensor_shape"],
                       window=info["window"], resample=info["resample"], crop_box=info["crop_box"],
                       notes=info["notes"], facts=facts, dicom=dicom)


def write_previews(prepared: PreparedAsk, folder, cache: ImageCache = NO_CACHE) -> None:
    """The montages of ``prepared`` into ``folder`` now: the worker draws them after the answer
    (asking with ``preview_dir=None``), so they never delay its first token."""
    _write_previews(prepared.model_images, prepared.records, prepared.edges, Path(folder), cache)


def write_shared_previews(prepared: PreparedAsk, folder) -> None:
    """One montage per distinct image and title in ``folder``, named by both, drawn only if not there yet:
    an evaluation asking many questions about one scan keeps one picture of it, not one per question
    (an image without a content key, an array from memory, gets a file of its own)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for image, record, edge in zip(prepared.model_images, prepared.records, prepared.edges):
        name = uuid.uuid4().hex if image.key is None else xxhash.xxh64(f"{image.key}|{record.label}".encode()).hexdigest()
        out = folder / f"{name}.png"
        if not out.is_file():
            render_montage([image], out, titles=[record.label], tile=64, edges=[edge])
        record.preview_png = str(out)


def _write_previews(images: list[ModelImage], records: list[ImageRecord], edges: list, folder: Path,
                    cache: ImageCache) -> None:
    """A montage PNG per image; one drawn before for the same image and title is written again, not redrawn
    (a cache that keeps no previews is neither asked nor given one: the PNG is not read back for it)."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}"  # unique: asks in one second don't share
    for k, (image, record, edge) in enumerate(zip(images, records, edges)):
        out = folder / f"{stamp}-{k}-{record.role}.png"
        key = None if image.key is None or not cache.previews.keeps else (image.key, record.label)
        png = None if key is None else cache.previews.get(key)
        if png is None:
            render_montage([image], out, titles=[record.label], tile=64, edges=[edge])
            if key is not None:
                cache.previews.put(key, out.read_bytes())
        else:
            storage.write_once(out, png)  # as a drawn one: whole or not at all
        record.preview_png = str(out)


def start(engine: "RadFMEngine", request: AskRequest, session: Session | None = None,
          images: ImageCache = NO_CACHE, prepared: PreparedAsk | None = None) -> tuple[PreparedAsk, Generation]:
    """Prepare the inputs (on the engine's device) and encode the images; the generation has not run yet.

    ``prepared``: the same request prepared before the model loaded (every input checked
    without waiting for the load), used as it is when its image tags fit the model.
    """
    if prepared is None or prepared.tokens_per_image != engine.model.dims.num_latents:
        prepared = prepare(request, session, engine.model.dims.num_latents, images, engine.device)
    generation = engine.stream(prepared.prompt, prepared.model_images, request.settings)
    return prepared, generation


def make_turn(engine: "RadFMEngine", request: AskRequest, prepared: PreparedAsk, result: GenerationResult,
              prepare_s: float) -> Turn:
    """The session turn for a finished generation, with its provenance."""
    return Turn(
        task=request.task,
        question=prepared.question,
        answer=result.text,
        stop_reason=result.stop_reason,
        prompt=_shorten_tags(prepared.prompt),
        images=prepared.records,
        provenance={
            **_provenance(request, engine.describe()),
            "timing": {
                "prepare_and_encode_s": round(prepare_s, 3),
                "time_to_first_token_s": None if result.time_to_first_token_s is None
                else round(result.time_to_first_token_s, 3),
                "generate_s": round(result.total_s, 3),
                "new_tokens": len(result.token_ids),
                "prompt_tokens": result.prompt_tokens,
                "tokens_per_s": round(result.tokens_per_s, 2),
            },
        },
    )


def cut_turn(request: AskRequest, answer: str, stop_reason: str, error: str | None = None,
             prepared: PreparedAsk | None = None, model: dict | None = None) -> Turn:
    """The turn of an answer cut short (Ctrl-C, a server gone mid-answer): the words so far, with
    what is known of what produced them (without ``prepared``, as over a server, not the images)."""
    return Turn(
        task=request.task,
        question=prepared.question if prepared else task_question(request.task, request.question),
        answer=answer,
        stop_reason=stop_reason,
        error=error,
        prompt=_shorten_tags(prepared.prompt) if prepared else "",
        images=prepared.records if prepared else [],
        provenance=_provenance(request, model or {}),
    )


def _provenance(request: AskRequest, model: dict) -> dict:
    return {"model": model, "settings": request.settings.to_dict(), "history": request.history,
            "included_previous_turns": request.include_previous_turns}


def ask(engine: "RadFMEngine", request: AskRequest, session: Session | None = None, on_text=None,
        prepared: PreparedAsk | None = None) -> Turn:
    """Answer one request to the end (streaming deltas to ``on_text``); add the turn to ``session``."""
    t0 = time.perf_counter()
    prepared, generation = start(engine, request, session, prepared=prepared)
    prepare_s = time.perf_counter() - t0
    result = generation.run(on_text)
    turn = make_turn(engine, request, prepared, result, prepare_s)
    if session is not None:
        session.add_turn(turn)
    return turn


def _shorten_tags(prompt: str) -> str:
    """The prompt as a reader wants it: each 34-token image tag shown as ``<image k>``."""
    counter = iter(range(1, 1000))
    return re.sub(r"<image>(?:<image\d+>)+</image>", lambda m: f"<image {next(counter)}>", prompt)
