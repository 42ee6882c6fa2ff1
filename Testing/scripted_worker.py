"""ScriptedWorkerClient: the worker client's API with no process and no model, for panel tests.

Each ask is prepared by the real RadFMSlicer pipeline (``ask_request_from_json`` +
``prepare``), so a request the worker would reject fails here too and every turn carries
real previews and provenance (``make_turn``). Then it replays a script, one item per
``poll()``: text (a token event), ``PAUSE`` (nothing until ``resume()``), or an error
Event. When the script ends, or after ``cancel()``, a done event carries the turn.
"""

import re
import shutil
import tempfile
import weakref

import torch

from RadFMSlicer.ask import make_turn, prepare
from RadFMSlicer.attention import write_npy_for_ask
from RadFMSlicer.errors import RadFMError
from RadFMSlicer.generation import GenerationResult
from RadFMSlicer.worker.protocol import Event, ask_request_from_json

PAUSE = "<pause>"
STOPPED_BY = "<stopped by>"  # followed by a stop reason: the answer ends there with it (as a worker's done)
CRASH = Event("error", "the RadFM worker killed by SIGKILL (out of memory, or killed by hand).",
              {"kind": "worker_died"})


def tokens(text: str) -> list:
    """Split an answer into word-sized token deltas (spaces kept), as a tokenizer streams them."""
    return re.findall(r"\s*\S+", text)


class _Model:
    """What ``make_turn`` asks of an engine: its description."""

    def __init__(self, load_args):
        self.load_args = load_args

    def describe(self):
        return {"checkpoint": self.load_args["folder"], "device": self.load_args["device"],
                "dtype": self.load_args["dtype"], "quantization": self.load_args["quantization"]}


class _PeakedAttention:
    """An engine's ``image_attention``: all of it on the first patch (the corner at i, j, k = 0 of
    the model image), so a test knows where the map must land on the scan."""

    def image_attention(self, image):
        _, h, w, d = image.tensor.shape
        grid = torch.zeros(1, h // 32, w // 32, d // 4)
        grid[0, 0, 0, 0] = 1.0
        return grid


class ScriptedRequest:
    def __init__(self, client, request, prepared, script, attention=None):
        self.client, self.request, self.prepared = client, request, prepared
        self.attention = attention  # the turn's provenance entry, as the worker's (attention: true)
        self.script = list(script)
        self.text = ""
        self.cancelled = self.finished = False

    def poll(self) -> list:
        if self.finished:
            return []
        if self.cancelled or not self.script:
            return [self._done("cancelled" if self.cancelled else "eos")]
        item = self.script[0]
        if item == PAUSE:
            return []
        self.script.pop(0)
        if item == STOPPED_BY:
            return [self._done(self.script.pop(0))]
        if isinstance(item, Event):
            self.finished = True
            self.client.crashed = item.data.get("kind") == "worker_died"
            return [item]
        self.text += item
        return [Event("token", item)]

    def events(self, timeout=60):
        while not self.finished:
            yield from self.poll()

    def resume(self):
        self.script.remove(PAUSE)

    def cancel(self):
        self.cancelled = True

    def _done(self, stop_reason: str) -> Event:
        self.finished = True
        result = GenerationResult([0] * len(tokens(self.text)), self.text, stop_reason, 100, 0.5, 2.0)
        turn = make_turn(_Model(self.client.loaded), self.request, self.prepared, result, 0.3)
        if self.attention:
            turn.provenance["attention"] = self.attention
        return Event("done", self.text, {"answer": self.text, "stop_reason": stop_reason, "turn": turn.to_dict()})


class Encoded:
    """An encode request, finished at once."""

    def __init__(self, final: Event):
        self.final = final

    def wait(self, timeout=600) -> Event:
        return self.final


class ScriptedWorkerClient:
    """``scripts`` is shared by every client a test starts: one script per ask, in order."""

    def __init__(self, scripts: list, load_gate=None):
        self.scripts = scripts
        self.load_gate = load_gate  # a threading.Event: load() waits for it, like a slow model load
        self.asks, self.requests, self.encodes = [], [], []
        self.loaded = None
        self.closed = self.crashed = False
        self.preview_dir = tempfile.mkdtemp(prefix="radfm-scripted-previews-")  # goes like a WorkerClient's
        self._remove_previews = weakref.finalize(self, shutil.rmtree, self.preview_dir, ignore_errors=True)

    def load(self, folder, device="cpu", dtype="float32", quantization=None):
        if self.load_gate is not None:
            self.load_gate.wait(10)
        self.loaded = {"folder": str(folder), "device": device, "dtype": dtype, "quantization": quantization}

    def ask(self, **kwargs) -> ScriptedRequest:
        self.asks.append(kwargs)
        request = ask_request_from_json({**kwargs, "preview_dir": self.preview_dir})
        attention = None
        try:
            prepared, script = prepare(request), self.scripts.pop(0)
            if kwargs.get("attention"):  # mapped onto the scan's grid and written like the worker's
                attention = write_npy_for_ask(_PeakedAttention(), prepared, self.preview_dir)
        except RadFMError as exc:  # the worker answers a bad request with an error event
            prepared, script = None, [Event("error", str(exc), {"kind": type(exc).__name__})]  # as the worker
        self.requests.append(ScriptedRequest(self, request, prepared, script, attention))
        return self.requests[-1]

    def encode(self, images, window=None) -> "Encoded":
        """The worker's encode ahead of a question: the images prepared by the real pipeline."""
        self.encodes.append({"images": images, "window": window})
        try:
            prepare(ask_request_from_json({"question": "ahead", "images": images, "window": window}))
            return Encoded(Event("done", f"{len(images)} image(s) encoded"))
        except RadFMError as exc:
            return Encoded(Event("error", str(exc)))

    def alive(self):
        return not (self.crashed or self.closed)

    def close(self):
        self.closed = True
        self._remove_previews()
