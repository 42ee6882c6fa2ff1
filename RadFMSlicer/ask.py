"""From a request (scans, regions, task, question) to a prompt, model images and a session turn.

The CLI, the batch runner, the worker and the Slicer module all ask through here, so an
answer produced anywhere records the same provenance.
"""

import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from . import storage
from .engine import RadFMEngine
from .errors import ImageError, PromptError
from .generation import Generation, GenerationResult, GenerationSettings
from .image_cache import NO_CACHE, ImageCache
from .imaging import ModelImage, Volume, load_volume, parse_window, preprocess, split_npy_index, volume_from_array
from .preview import render_montage
from .prompts import ORDINALS, PromptImage, build_prompt, task_question
from .regions import check_corner, region_from_box, region_from_mask
from .session import REGION_NOTE, ImageRecord, Session, Turn

ROLE_LABELS = {"current": "current study", "prior": "prior study"}


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
        if array_file is not None:
            item["array"] = _load_npy(array_file, "array file", mmap_mode="r")
            item["array_file"] = array_file
            item.setdefault("name", Path(array_file).stem)
        _check_fields(cls, item, "image")
        return cls(**item)

    def load(self) -> Volume:
        self._check_source()
        if self.array is not None:
            return volume_from_array(np.asarray(self.array), np.asarray(self.ijk_to_ras, float),
                                     name=self.name or "array", modality=self.modality)
        return load_volume(self.path, series=self.series)

    def check(self) -> None:
        """What can be checked without reading pixels: the source exists, the window is spelled right."""
        self._check_source()
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
    """A marked region of image ``image``: a label mask (file or array) or a box (RAS or IJK)."""

    name: str = "region"
    image: int = 0
    mask: "str | np.ndarray | None" = None
    label: int | None = None
    box_ras: list | None = None  # [[x0, y0, z0], [x1, y1, z1]]
    box_ijk: list | None = None  # [[i0, j0, k0], [i1, j1, k1]] of the original grid
    margin_mm: float = 10.0

    @classmethod
    def from_json(cls, item: dict) -> "RegionInput":
        if not isinstance(item, dict):
            raise ImageError(f"a region must be an object, got {item!r}")
        _check_fields(cls, item, "region")
        region = cls(**item)
        if isinstance(region.mask, str) and region.mask.endswith(".npy"):
            region.mask = _load_npy(region.mask, "region mask file")
        return region

    def locate(self, volume: Volume):
        if self.mask is not None:
            return region_from_mask(volume, self.mask, label=self.label, margin_mm=self.margin_mm, name=self.name)
        if self.box_ras is not None:
            return region_from_box(volume, self.box_ras[0], self.box_ras[1], margin_mm=self.margin_mm, name=self.name)
        if self.box_ijk is not None:
            return region_from_box(volume, ijk_min=self.box_ijk[0], ijk_max=self.box_ijk[1],
                                   margin_mm=self.margin_mm, name=self.name)
        raise ImageError(f"region {self.name!r} needs a mask, box_ras or box_ijk")

    def check(self, n_images: int) -> None:
        """What can be checked without the image: one kind of region, its numbers, its image."""
        given = [k for k in ("mask", "box_ras", "box_ijk") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ImageError(f"region {self.name!r} needs exactly one of mask, box_ras or box_ijk (got {given or 'none'})")
        if isinstance(self.image, bool) or not isinstance(self.image, int):
            raise ImageError(f"region {self.name!r}: 'image' is the index of its image (0 = the first), "
                             f"got {self.image!r}")
        if not 0 <= self.image < n_images:
            raise ImageError(f"region {self.name!r} refers to image {self.image + 1}, "
                             f"but {n_images} image(s) were given")
        if self.label is not None and (isinstance(self.label, bool) or not isinstance(self.label, int)):
            raise ImageError(f"region {self.name!r}: the label must be an integer, got {self.label!r}")
        box = self.box_ras if self.box_ras is not None else self.box_ijk
        if box is not None:
            if not isinstance(box, (list, tuple)) or len(box) != 2:
                raise ImageError(f"region {self.name!r}: a box is two corners [[x0, y0, z0], [x1, y1, z1]]")
            for corner, what in zip(box, ("first corner", "second corner")):
                check_corner(corner, what, self.name)
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

    @classmethod
    def from_dict(cls, fields: dict) -> "AskRequest":
        """The one way front ends' fields become a request: CLI flags, a worker or HTTP line.

        The task defaults to vqa with a question, else report; generation settings come
        from their own keys (``max_new_tokens``, ``temperature``, ...); images and regions
        are objects already or their JSON form; a ``[center, width]`` window is allowed.
        """
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
            include_previous_turns=bool(fields.get("include_previous_turns")),
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
    if not request.images:
        raise ImageError("no image given: RadFM answers about an image (--image PATH)")
    if len(request.images) + len(request.regions) > len(ORDINALS):
        raise PromptError(f"at most {len(ORDINALS)} images and regions per question")
    question = task_question(request.task, request.question)
    parse_window(request.window)
    for item in request.images:
        item.check()
    for region in request.regions:
        region.check(len(request.images))
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
        records.append(_record(image, item.role, item.name or Path(image.source).name, None))
    for region_input in request.regions:
        region = region_input.locate(volumes[region_input.image])
        parent = model_images[region_input.image]
        image = preprocess(region.volume, parent.window, interpolation=request.interpolation, device=device)
        facts = region.facts(ORDINALS[len(labels)])
        model_images.append(image)
        edges.append(edges[region_input.image])  # a crop keeps its image's orientation
        labels.append(PromptImage(f'marked region "{region.name}"', facts))
        records.append(_record(image, "region", region.name, facts, region.describe()))
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


def _record(image: ModelImage, role: str, label: str, facts: str | None, region: str | None = None) -> ImageRecord:
    info = image.to_dict()
    if region:
        info["notes"] = info["notes"] + [f"{REGION_NOTE}{region}"]
    return ImageRecord(role=role, label=label, source=image.source, shape=info["tensor_shape"],
                       window=info["window"], resample=info["resample"], crop_box=info["crop_box"],
                       notes=info["notes"], facts=facts)


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
            out.write_bytes(png)
        record.preview_png = str(out)


def start(engine: RadFMEngine, request: AskRequest, session: Session | None = None,
          images: ImageCache = NO_CACHE, prepared: PreparedAsk | None = None) -> tuple[PreparedAsk, Generation]:
    """Prepare the inputs (on the engine's device) and encode the images; the generation has not run yet.

    ``prepared``: the same request prepared before the model loaded (every input checked
    without waiting for the load), used as it is when its image tags fit the model.
    """
    if prepared is None or prepared.tokens_per_image != engine.model.dims.num_latents:
        prepared = prepare(request, session, engine.model.dims.num_latents, images, engine.device)
    generation = engine.stream(prepared.prompt, prepared.model_images, request.settings)
    return prepared, generation


def make_turn(engine: RadFMEngine, request: AskRequest, prepared: PreparedAsk, result: GenerationResult,
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


def ask(engine: RadFMEngine, request: AskRequest, session: Session | None = None, on_text=None,
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
