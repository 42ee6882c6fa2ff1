"""Viewer -> first token: a 512 x 512 x 300 int16 CT through the real worker, tiny LLM.

The tiny checkpoint keeps the model's own work small, so what is measured is the path
around it: the panel's hand-over (``Assistant.build_ask`` saves the node's array as an
int16 ``.npy`` once per change of the node), the worker reading, reorienting, windowing
and resampling it, identifying the image, the encoder (first question only) and the
prefill. Also a ``.nii.gz`` file asked about by path. Two workers run side by side, one on
today's path (:mod:`bench.today`, switched on by ``bench/today_site/sitecustomize.py``),
rounds interleaved; every round is a new scan (the node's voxels changed), then follow-ups.
Then another new scan chosen in the panel before the question is typed: ours prepares it
ahead (``Assistant.prepare_ahead``, waited for here as typing would), today's has nothing
to do until the question comes. "Overhead" subtracts the tiny model's own encode +
prefill, timed in this process.
``RADFM_BENCH_WORKER_THREADS=N`` runs both workers (and that timing) with N intra-op
threads: on a busy 2-core machine the tiny model's small ops wait on the scheduler at 2.
"""

import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from RadFMSlicer.engine import RadFMEngine
from RadFMSlicer.imaging import load_volume, preprocess, volume_from_array
from RadFMSlicer.testing import make_tiny_checkpoint
from RadFMSlicer.worker import WorkerClient

from . import today
from .common import CT_GEOMETRY, PROJECT, Result, compare, engine_first_token_s, memory_fields, tokenizer_model

sys.path.insert(0, str(PROJECT / "RadFMModule"))
from RadFMModuleLib.assistant import Assistant, Selection, VolumeData  # noqa: E402
from RadFMModuleLib.settings import ModelSettings  # noqa: E402

SHAPE = (300, 512, 512)  # k, j, i
TODAY_SITE = Path(__file__).resolve().parent / "today_site"
QUESTIONS = ("Is there a pleural effusion?", "Is there a pneumothorax?", "Any lung nodule?")


class ViewerScene:
    """The viewer holding one CT node (the assistant's Scene protocol, what build_ask reads)."""

    def __init__(self):
        self.array, self.version = None, 0

    def show(self, array):
        self.array, self.version = array, self.version + 1  # the node's voxels changed

    def volume(self, volume_id):
        return VolumeData("CT", self.array, CT_GEOMETRY, (40.0, 400.0), str(self.version))

    def regions(self):
        return []


def ct(seed: int) -> np.ndarray:
    """A CT-like int16 volume in HU (air, soft tissue, bone), different per seed."""
    rng = np.random.default_rng(seed)
    array = np.full(SHAPE, -1000, dtype=np.int16)
    array[:, 64:448, 64:448] = rng.integers(-100, 200, (SHAPE[0], 384, 384), dtype=np.int16)
    array[:, 240:272, 240:272] = 900
    return array


def first_token_s(client, started: float, **ask) -> float:
    request = client.ask(**ask, max_new_tokens=1)
    event = next(e for e in request.events(600) if e.kind in ("token", "done", "error"))
    seconds = time.perf_counter() - started
    final = request.wait(600)
    if event.kind == "error" or final.kind == "error":
        raise SystemExit(f"the worker failed: {(final if final.kind == 'error' else event).text}")
    return seconds


def model_s(checkpoint: Path, image) -> tuple[float, float]:
    """The tiny model's own time: (encode + prefill, prefill) for this image, in this process."""
    engine = RadFMEngine.load(checkpoint)
    prompt = engine.image_tag(0) + QUESTIONS[0]
    best_cold, best_follow = float("inf"), float("inf")
    for _ in range(3):
        engine.cache.clear()
        for cold in (True, False):
            seconds = engine_first_token_s(engine, prompt, [image])
            if cold:
                best_cold = min(best_cold, seconds)
            else:
                best_follow = min(best_follow, seconds)
    return best_cold, best_follow


def run(recorder, quick: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="radfm-bench-viewer-") as work:  # the checkpoint, 150 MB scans
        _run(recorder, quick, Path(work))


def _run(recorder, quick: bool, work: Path) -> None:
    rounds = 2 if quick else 3
    checkpoint = make_tiny_checkpoint(work / "tiny", tokenizer_model=tokenizer_model())
    scans = [ct(seed) for seed in range(rounds + 1)]  # a new scan every round: each first question is cold
    chosen_ahead = [ct(seed) for seed in range(rounds + 1, 2 * rounds + 2)]  # others, chosen before the question
    files = []
    for k, array in enumerate(scans):  # the same scans as files, asked about by path
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.7, 0.7, 2.5))
        files.append(str(work / f"ct-{k}.nii.gz"))
        sitk.WriteImage(image, files[-1], useCompression=True)
    threads = os.environ.get("RADFM_BENCH_WORKER_THREADS")
    env = dict(os.environ, **({"OMP_NUM_THREADS": threads} if threads else {}))
    env_today = dict(env, PYTHONPATH=os.pathsep.join([str(TODAY_SITE), os.environ.get("PYTHONPATH", "")]))
    clients = {"today": WorkerClient.start(env=env_today), "ours": WorkerClient.start(env=env)}
    times = {(path, name, kind): [] for path in ("viewer", "file", "ahead") for name in clients
             for kind in ("first", "follow")}
    settings = ModelSettings(checkpoint_folder=str(checkpoint), device="cpu", precision="float32")
    scenes = {name: ViewerScene() for name in clients}
    assistants = {name: Assistant(scenes[name], start_client=lambda python, c=client: c, settings=settings)
                  for name, client in clients.items()}
    try:
        for assistant in assistants.values():
            assistant.connect()  # loads the tiny checkpoint, as the panel's first question does
        for round_ in range(rounds + 1):  # round 0 warms both workers up (imports, kernels)
            for name, client in clients.items():
                scene, assistant = scenes[name], assistants[name]

                def viewer_first_token_s(question):
                    started = time.perf_counter()
                    ask = assistant.build_ask("vqa", question, Selection("ct"))
                    ask.pop("max_new_tokens")
                    return first_token_s(client, started, **ask)

                scene.show(scans[round_])
                for kind, question in zip(("first", "follow", "follow"), QUESTIONS):
                    seconds = viewer_first_token_s(question)
                    if round_:
                        times["viewer", name, kind].append(seconds)
                scene.show(chosen_ahead[round_])
                if name == "ours":
                    assistant.prepare_ahead(Selection("ct")).join()  # done while the radiologist types
                seconds = viewer_first_token_s(QUESTIONS[0])
                if round_:
                    times["ahead", name, "first"].append(seconds)
                for kind, question in zip(("first", "follow", "follow"), QUESTIONS):
                    started = time.perf_counter()
                    seconds = first_token_s(client, started, question=question, images=[files[round_]],
                                            window="40,400")
                    if round_:
                        times["file", name, kind].append(seconds)
    finally:
        for assistant in assistants.values():
            assistant.close()  # its client and its hand-over files
    image = preprocess(load_volume(files[0]), "40,400")
    if threads:
        torch.set_num_threads(int(threads))
    model_first, model_follow = model_s(checkpoint, image)
    paths = (("viewer", "panel hand-over (.npy int16)", ("first", "follow")),
             ("file", ".nii.gz by path", ("first", "follow")),
             ("ahead", "chosen in the panel, then the question typed", ("first",)))
    for path, what, kinds in paths:
        for kind in kinds:
            for name in clients:
                encoded = kind == "follow" or (path == "ahead" and name == "ours")  # before the question came
                model = model_follow if encoded else model_first
                seconds = statistics.median(times[path, name, kind])
                first = statistics.median(times[path, name, "first"])
                ours = "ours: prepared ahead" if path == "ahead" else "ours: fingerprints + worker image cache"
                recorder.add(Result(
                    "viewer", f"viewer -> first token, 512x512x300 int16 CT, {what}: "
                              f"{'first question' if kind == 'first' else 'follow-up'}",
                    "today's path" if name == "today" else ours,
                    {"shape": list(SHAPE), "dtype": "int16", "path": path, "question": kind, "rounds": rounds,
                     "checkpoint": "tiny (make_tiny_checkpoint)", "threads": torch.get_num_threads()},
                    seconds, name == "today",
                    {"overhead_s": round(seconds - model, 4), "model_s": round(model, 4),
                     "x_first_question": round(seconds / first, 4),
                     "memory": f"overhead {seconds - model:.3f} s (model {model:.3f} s)"
                               + ("" if kind == "first" else f", {seconds / first:.3f}x first question")},
                ))


def preprocessing(recorder, quick: bool) -> None:
    """``preprocess`` alone on the 300-slice CT (soft-tissue window), against today's."""
    volume = volume_from_array(ct(0), CT_GEOMETRY, name="ct")
    for interpolation in ("nearest",) if quick else ("nearest", "linear"):
        calls = {"today: window the whole volume, then interpolate": partial(today.preprocess, volume, "40,400",
                                                                              interpolation=interpolation),
                 "ours: no full-volume float temporaries": partial(preprocess, volume, "40,400",
                                                                   interpolation=interpolation)}
        for name, (seconds, peak, extra) in compare(calls, repeats=3).items():
            recorder.add(Result(
                "preprocess", f"preprocess 512x512x300 int16 CT -> [3, 512, 512, 64], {interpolation}", name,
                {"shape": list(SHAPE), "interpolation": interpolation, "window": "40,400"},
                seconds, name.startswith("today"), memory_fields(peak, extra),
            ))
