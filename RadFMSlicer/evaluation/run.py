"""An evaluation run: every manifest case answered through one model, scored, summarised.

The model is an engine loaded here or a ``radfm serve`` reached through
:class:`~RadFMSlicer.remote.RemoteClient` (:class:`LocalModel`, :class:`ServerModel`): the
same cases, records and pages either way.

``RUN/cases.jsonl`` holds one record per case (answer, reference, scores, what the model saw,
provenance, timings; a failed case holds its error instead of an answer) and is appended
through :mod:`RadFMSlicer.batch`, so a run killed half-way resumes where it stopped.
``RUN/summary.json`` and the gallery ``RUN/index.html`` are rebuilt from ``cases.jsonl`` at the
end of every run. Cases that
share a scan are answered one after another, so the engine's encoding cache encodes each
distinct image once.
"""

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .. import storage
from ..ask import AskRequest, ImageInput, RegionInput, ask, prepare, write_shared_previews
from ..attention import overlay, patch_map, write_for_ask
from ..batch import append_record, finished_ids
from ..errors import RadFMError
from ..generation import GenerationSettings
from ..image_cache import NO_CACHE, ImageCache
from ..preview import render_montage
from ..http_client import ServerUnavailable
from ..remote import RemoteClient, ask_server
from ..session import Turn
from . import metrics
from .datasets import Case
from .gallery import write_gallery
from .records import read_cases

SUMMARY_FORMAT = 1
TOY_WIDTH = 1024  # an LLM narrower than this is a test checkpoint: its text is noise
TOY_NOTE = "toy-size random-weight checkpoint: its answers are noise, the scores only check the pipeline"


def request_for(case: Case, settings: GenerationSettings, window=None, interpolation: str = "nearest") -> AskRequest:
    """The ask request of one case: its scans (first current, later priors), region and question."""
    regions = []
    if case.region_mask:
        mask, label = case.region_mask
        regions.append(RegionInput(mask=mask, label=label))
    if case.box:
        regions.append(RegionInput(box_ras=[case.box[:3], case.box[3:]]))
    return AskRequest(
        task=case.task, question=case.question, regions=regions, window=window, interpolation=interpolation,
        images=[ImageInput(path=p, role="current" if k == 0 else "prior") for k, p in enumerate(case.images)],
        settings=settings,
    )


def _safe_name(case_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in case_id)[:80] or "case"


class LocalModel:
    """Cases answered by an engine loaded in this process."""

    def __init__(self, engine):
        self.engine = engine
        self.tokens_per_image, self.device = engine.model.dims.num_latents, engine.device
        self.unavailable: ServerUnavailable | None = None  # a local engine does not go away

    def made_with(self) -> dict:
        model = self.engine.describe()
        return {"checkpoint": model["checkpoint_fingerprint"] or model["checkpoint"], "dtype": model["dtype"],
                "quantization": model["quantization"]}

    def describe(self) -> dict:
        return self.engine.describe() | {"toy": self.engine.model.dims.llm_dim < TOY_WIDTH}

    def encodes(self) -> int:  # each miss of either cache was one encode
        return self.engine.cache.misses + self.engine.attention_cache.misses

    def cache_hits(self) -> int:
        return self.engine.cache.hits

    def answer(self, request: AskRequest, prepared) -> Turn:
        return ask(self.engine, request, prepared=prepared)


class ServerModel:
    """Cases answered by a ``radfm serve`` (as ``radfm ask --server``: :func:`~RadFMSlicer.remote.ask_server`).

    Scans are still read and preprocessed here, so every case is checked before anything is
    sent and the gallery's thumbnails are drawn here (the server keeps no picture of a scan).
    """

    tokens_per_image, device = 32, None  # the local preparation only checks and draws; the server builds the prompt

    def __init__(self, client: RemoteClient):
        from ..worker import WorkerError

        self.client = client
        try:
            self.model = client.load()["model"] or {}  # reachable, the token accepted, a model loaded
        except WorkerError as exc:
            raise RadFMError(str(exc)) from None
        self.unavailable: ServerUnavailable | None = None

    def made_with(self) -> dict:
        return {"server": self.client.url, "dtype": self.model.get("dtype"),
                "quantization": self.model.get("quantization")}

    def describe(self) -> dict:
        return self.model | {"server": self.client.url, "toy": None}  # the server does not say the model's width

    def encodes(self) -> None:  # the server's encoding cache is its own
        return None

    cache_hits = encodes

    def answer(self, request: AskRequest, prepared) -> Turn:
        try:
            turn = ask_server(self.client, request)
        except ServerUnavailable as exc:
            self.unavailable = exc
            raise
        for image, local in zip(turn.images, prepared.records):  # the server only saw "image k"
            image.source, image.preview_png = local.source, local.preview_png
        return turn


def answer_case(model: "LocalModel | ServerModel", case: Case, run_dir: Path, settings: GenerationSettings,
                window=None, interpolation: str = "nearest", images: ImageCache = NO_CACHE,
                attention: bool = False, clinical: "metrics.ClinicalScorer | None" = None) -> dict:
    """The record of one case: answered and scored, or its error (a bad scan never stops the run).

    ``images``: recent scans and model images, so cases on one scan read and resample it once.
    ``attention``: also write where the resampler looked (see :func:`_write_attention`).
    ``clinical``: the clinical metrics that also score open text.
    """
    record = case.to_dict()  # a fresh dict, id first
    started = time.perf_counter()
    try:
        request = request_for(case, settings, window, interpolation)
        prepared = prepare(request, None, model.tokens_per_image, images, model.device)
        write_shared_previews(prepared, run_dir / "previews")  # one per scan, however many cases ask about it
        looked = _write_attention(model.engine, prepared, run_dir, _safe_name(case.id)) if attention else None
        turn = model.answer(request, prepared)
    except RadFMError as exc:
        record["error"] = str(exc)
    else:
        if looked:
            turn.provenance["attention"] = looked
        seen = [asdict(image) | {"preview_png": os.path.relpath(image.preview_png, run_dir)}
                for image in turn.images]
        record.update(answer=turn.answer, stop_reason=turn.stop_reason,
                      scores=metrics.score_case(case.task, turn.answer, case.reference, clinical),
                      prompt=turn.prompt, seen=seen, provenance=turn.provenance)
    record["case_s"] = round(time.perf_counter() - started, 3)
    return record


def _write_attention(engine, prepared, run_dir: Path, name: str) -> dict:
    """``RUN/attention/<id>.nii.gz`` on the scan's grid and ``<id>.png``, the thumbnails with it overlaid;
    computed with the encoding, which the answer then reuses (the scan ``prepared`` holds, not read again)."""
    folder = run_dir / "attention"
    folder.mkdir(exist_ok=True)
    info = write_for_ask(engine, prepared, folder / f"{name}.nii.gz")
    image = prepared.model_images[0]
    png = render_montage([image], folder / f"{name}.png", titles=[prepared.records[0].label], tile=64,
                         overlays=[overlay(patch_map(engine, image), image)])
    return info | {"file": os.path.relpath(info["file"], run_dir), "thumbnail": os.path.relpath(png, run_dir)}


def _by_shared_scans(cases: list[Case]) -> list[Case]:
    """Cases grouped by their scans (first appearance order), so each scan is encoded once."""
    first = {}
    for case in cases:
        first.setdefault(tuple(case.images), len(first))
    return sorted(cases, key=lambda c: first[tuple(c.images)])


def chosen_settings(settings: GenerationSettings, window, interpolation: str) -> dict:
    """The part of :func:`run_settings` known before the model is loaded or the server asked."""
    return {**settings.to_dict(), "window": window, "interpolation": interpolation, "score_scale": metrics.SCALE}


def run_settings(model: "LocalModel | ServerModel", settings: GenerationSettings, window, interpolation: str) -> dict:
    """What makes a run's answers comparable: resuming a run under other settings is refused
    (a run made here names its checkpoint, one made on a server the server's address)."""
    return {**model.made_with(), **chosen_settings(settings, window, interpolation)}


def run_eval(engine, cases: list[Case], run_dir: "str | Path", settings: GenerationSettings | None = None, *,
             window=None, interpolation: str = "nearest", manifest: str | None = None, progress: bool = True,
             force: bool = False, attention: bool = False, clinical: "metrics.ClinicalScorer | None" = None) -> dict:
    """Answer the cases not yet answered in ``run_dir``, then write and return the summary.

    ``engine``: a loaded engine, a function loading one (called once the run folder accepts the
    settings: a resume refused for its generation settings, window or interpolation costs no load),
    or a :class:`~RadFMSlicer.remote.RemoteClient` of the server that answers every case. A server
    that cannot answer (gone, the token refused, its queue full) ends the run after recording that
    case's error (retried on resume) and writing the summary: every later case would fail the same way.
    ``force``: resume a run folder made with other settings (each record keeps its own).
    ``attention``: write each case's resampler attention map and overlaid thumbnail.
    ``clinical``: radeval's metrics (built before the model loads), scoring each open-text answer too.
    """
    from tqdm import tqdm

    on_server = isinstance(engine, RemoteClient)
    if attention and on_server:
        raise RadFMError("--attention needs the model in this process (--checkpoint), not --server")
    settings = settings or GenerationSettings()
    run_dir = Path(run_dir)
    out = run_dir / "cases.jsonl"
    finished_ids(out, chosen_settings(settings, window, interpolation), force, partial=True)
    model = ServerModel(engine) if on_server else LocalModel(engine() if callable(engine) else engine)
    run_dir.mkdir(parents=True, exist_ok=True)
    made_with = run_settings(model, settings, window, interpolation)
    done = finished_ids(out, made_with, force)
    todo = _by_shared_scans([c for c in cases if c.id not in done])
    hits, misses = model.cache_hits(), model.encodes()
    started = time.perf_counter()
    ran = failed = 0
    images = ImageCache()
    with open(out, "a") as f, tqdm(todo, unit="case", file=sys.stderr, disable=not progress, desc=str(run_dir),
                                   total=len(cases), initial=len(cases) - len(todo)) as bar:  # resumed: starts part-way
        for case in bar:
            record = answer_case(model, case, run_dir, settings, window, interpolation, images, attention, clinical)
            record["run_settings"] = made_with
            failed += "error" in record
            bar.set_postfix(failed=failed, refresh=False)
            append_record(f, record)
            ran += 1
            if model.unavailable:
                break
    this_run = {
        "answered": ran - failed, "failed": failed, "skipped_as_done": len(cases) - len(todo),
        "wall_s": round(time.perf_counter() - started, 3),
        "images_encoded": None if misses is None else model.encodes() - misses,
        "images_from_cache": None if hits is None else model.cache_hits() - hits,
    }
    records = manifest_records(run_dir, cases)
    summary = write_summary(run_dir, records, len(cases), {
        "manifest": manifest, "model": model.describe(), "settings": settings.to_dict(), "window": window,
        "interpolation": interpolation, "last_run": this_run}, clinical)
    write_gallery(run_dir, records, summary)
    if model.unavailable:
        raise RadFMError(f"stopped at case {case.id!r}: {model.unavailable}; the cases recorded so far (this one "
                         f"with its error) are kept in {out}: rerun the same command to resume")
    return summary


def manifest_records(run_dir: Path, cases: list[Case]) -> list[dict]:
    """The run's latest record of each manifest case, in manifest order (cases not yet run left out)."""
    order = {case.id: n for n, case in enumerate(cases)}
    return sorted((r for r in read_cases(run_dir) if r["id"] in order), key=lambda r: order[r["id"]])


def write_summary(run_dir: Path, records: list[dict], total: int, info: dict,
                  clinical: "metrics.ClinicalScorer | None" = None) -> dict:
    """``RUN/summary.json``: metrics overall, per task and per extra column, failures, provenance, and
    what to keep in mind reading them (a metric trained on chest X-ray reports on a CT/MR run)."""
    answered = [r for r in records if "answer" in r]
    failures = [{"id": r["id"], "error": r["error"]} for r in records if "answer" not in r]
    summary = {
        "format": SUMMARY_FORMAT,
        "note": TOY_NOTE if info["model"].get("toy") else None,
        "cases": {"total": total, "answered": len(answered), "failed": len(failures),
                  "not_run": total - len(records)},
        "metrics": metrics.breakdown(answered),
        "metric_notes": metrics.domain_notes(answered),
        "failures": failures,
        "scoring": metrics.provenance(clinical),
        "timing": {"mean_case_s": round(sum(r["case_s"] for r in answered) / len(answered), 3) if answered else None},
        **info,
    }
    storage.write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def _cell(key: str, entry: dict | None) -> str:
    if not entry:
        return "-"
    text = metrics.metric(key).text
    return f"{text(entry['mean'])} [{text(entry['ci95'][0])}, {text(entry['ci95'][1])}]"


def format_table(summary: dict) -> str:
    """The summary as a text table, each metric as :data:`~.metrics.METRICS` shows it, with its 95 % CI."""
    m = summary["metrics"]
    rows = [("overall", m["overall"])] + sorted(m["by_task"].items())
    keys = metrics.ordered(k for k, v in m["overall"].items() if isinstance(v, dict))  # accuracy, BLEU, ROUGE-L, ...
    width = 24
    header = f"{'task':<12}{'cases':>6}  " + "".join(f"{metrics.metric(k).label:<{width}}" for k in keys)
    lines = [header, "-" * len(header)]
    for name, entry in rows:
        lines.append(f"{name:<12}{entry['cases']:>6}  " + "".join(f"{_cell(k, entry.get(k)):<{width}}" for k in keys))
    c = summary["cases"]
    lines.append(f"{c['answered']} answered, {c['failed']} failed" + (f", {c['not_run']} not run" if c["not_run"] else "")
                 + f"; every score {metrics.SCALE}; 95% bootstrap intervals in brackets")
    lines += [f"note: {text}" for text in summary.get("metric_notes") or []]
    if summary.get("note"):
        lines.append("NOTE: " + summary["note"])
    return "\n".join(lines)
