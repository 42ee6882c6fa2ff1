"""The worker process: one loaded engine, requests in, events out to a sink.

:class:`WorkerServer` does not know how events travel. It hands each one to its *sink*,
a callable ``sink(request_id, event)`` (:class:`~.protocol.Event`), which must be safe to
call from several threads (the reader answers quick ops, the work thread streams work)
and should not block for long. :class:`JsonLinesSink` writes them as lines on stdout
(``python -m RadFMSlicer.worker``); another transport supplies its own sink and feeds
:meth:`WorkerServer.handle` with requests.

stdout carries only the protocol (anything else a library prints goes to stderr). Work
(load, encode, ask, unload) is served one request at a time in arrival order; hello,
status, cancel and shutdown are answered at once. A failing request gets an error event
and the worker keeps serving. When the input ends (the client went away) the worker
cancels what it is doing and exits.
"""

import json
import os
import queue
import sys
import threading
import time
import traceback

from .. import __version__
from ..errors import RadFMError
from ..image_cache import ImageCache
from .protocol import OPS, PROTOCOL_VERSION, WORK_OPS, Event, ask_request_from_json


class JsonLinesSink:
    """Events as JSON lines on a text stream (the worker's stdout)."""

    def __init__(self, out):
        self._out = out
        self._lock = threading.Lock()

    def __call__(self, request_id, event: Event) -> None:
        line = event.to_line(request_id)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()


class WorkerServer:
    def __init__(self, sink):
        self.sink = sink
        self._jobs: "queue.Queue[dict | None]" = queue.Queue()
        self._cancelled: set[str] = set()
        self._current_id: str | None = None
        self._current_generation = None
        self._state_lock = threading.Lock()
        self.engine = None
        self.load_args: dict | None = None
        self.images = ImageCache()  # scans and model images of recent questions: follow-ups reuse them

    def emit(self, request_id, kind: str, text: str = "", /, **data) -> None:
        self.sink(request_id, Event(kind, text, data))

    # --- input ----------------------------------------------------------------------------
    def serve(self, lines) -> None:
        """Handle JSON lines until the input ends or a shutdown request."""
        worker = threading.Thread(target=self._work_loop, name="radfm-work", daemon=True)
        worker.start()
        for line in lines:
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                if not isinstance(request, dict) or "op" not in request:
                    raise ValueError("a request is a JSON object with an 'op'")
            except ValueError as exc:
                self.emit(None, "error", f"malformed request: {exc}", kind="protocol")
                continue
            if not self.handle(request):
                break
        self._cancel_everything()
        self._jobs.put(None)
        worker.join(timeout=10)

    def handle(self, request: dict) -> bool:
        """Answer quick ops now, queue work; False means stop reading."""
        rid, op = request.get("id"), request["op"]
        if op == "hello":
            self.emit(rid, "done", "RadFMSlicer worker", version=__version__, protocol=PROTOCOL_VERSION, pid=os.getpid())
        elif op == "status":
            self.emit(rid, "done", "status", **self.status())
        elif op == "cancel":
            self.cancel(request.get("target"))
            self.emit(rid, "done", "cancel requested", target=request.get("target"))
        elif op == "shutdown":
            self.emit(rid, "done", "bye")
            return False
        elif op in WORK_OPS:
            self._jobs.put(request)
        else:
            self.emit(rid, "error", f"unknown op {op!r}; known: {', '.join(OPS)}")
        return True

    def cancel(self, target) -> None:
        with self._state_lock:
            if target == self._current_id and self._current_generation is not None:
                self._current_generation.cancel()
            else:
                self._cancelled.add(target)

    def _cancel_everything(self) -> None:
        with self._state_lock:
            if self._current_generation is not None:
                self._current_generation.cancel()

    def status(self) -> dict:
        import psutil
        import torch

        memory = {"rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}
        if torch.cuda.is_available():
            memory["cuda_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
            memory["cuda_reserved_mb"] = round(torch.cuda.memory_reserved() / 2**20, 1)
        return {"loaded": self.engine is not None, "model": self.engine.describe() if self.engine else None,
                "busy": self._current_id is not None, "memory": memory, "pid": os.getpid()}

    # --- work -----------------------------------------------------------------------------
    def _work_loop(self) -> None:
        while (request := self._jobs.get()) is not None:
            rid = request.get("id")
            with self._state_lock:
                if rid in self._cancelled:
                    self._cancelled.discard(rid)
                    self.emit(rid, "done", "", answer="", stop_reason="cancelled")
                    continue
                self._current_id = rid
            try:
                getattr(self, "op_" + request["op"])(rid, request)
            except RadFMError as exc:
                self.emit(rid, "error", str(exc), kind=type(exc).__name__)
            except Exception as exc:  # keep serving: report the bug with its traceback on stderr
                traceback.print_exc(file=sys.stderr)
                self.emit(rid, "error", f"internal error: {type(exc).__name__}: {exc}", kind="internal")
            finally:
                with self._state_lock:
                    self._current_id, self._current_generation = None, None

    def op_load(self, rid, request) -> None:
        from ..engine import RadFMEngine

        args = {k: request.get(k) for k in ("checkpoint", "device", "dtype", "quantization", "compile_decode",
                                            "vllm_url")}
        if not args["checkpoint"]:
            raise RadFMError("load needs a 'checkpoint' folder")
        self.emit(rid, "status", f"loading model from {args['checkpoint']}")
        self.engine = None
        start = time.perf_counter()
        self.engine = RadFMEngine.load(args["checkpoint"], device=args["device"] or "cpu", dtype=args["dtype"],
                                       quantization=args["quantization"],
                                       compile_decode=bool(args["compile_decode"]), vllm_url=args["vllm_url"])
        self.load_args = args
        self.emit(rid, "done", "model loaded", model=self.engine.describe(),
                  load_s=round(time.perf_counter() - start, 2))

    def op_unload(self, rid, request) -> None:
        import gc

        import torch

        self.engine = None
        self.images.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.emit(rid, "done", "model unloaded")

    def _require_engine(self):
        if self.engine is None:
            raise RadFMError("no model loaded: send a load request first (checkpoint folder)")
        return self.engine

    def op_encode(self, rid, request) -> None:
        """Encode ahead of a question: the same tensors an ``ask`` with these fields would make."""
        engine = self._require_engine()
        ask_request = ask_request_from_json(request)
        records = []
        for item in ask_request.images:
            self.emit(rid, "status", f"encoding {item.name or item.path}")
            image = self.images.model_image(ask_request, item, self.images.volume(item), engine.device)
            engine.encode_images([image])
            records.append(image.to_dict())
        self.emit(rid, "done", f"{len(records)} image(s) encoded", images=records)

    def op_ask(self, rid, request) -> None:
        from ..ask import make_turn, start
        from ..session import Session

        engine = self._require_engine()
        ask_request = ask_request_from_json(request)
        session = Session()
        for question, answer in request.get("previous_turns") or []:
            session.add_turn({"task": "vqa", "question": question, "answer": answer})
        self.emit(rid, "status", "preparing and encoding images")
        t0 = time.perf_counter()
        prepared, generation = start(engine, ask_request, session, self.images)
        prepare_s = time.perf_counter() - t0
        with self._state_lock:
            self._current_generation = generation
            if rid in self._cancelled:
                generation.cancel()
        self.emit(rid, "status", "generating")
        for delta in generation:
            self.emit(rid, "token", delta)
        result = generation.result
        turn = make_turn(engine, ask_request, prepared, result, prepare_s)
        self.emit(rid, "done", result.text, answer=result.text, stop_reason=result.stop_reason, turn=turn.to_dict())


def main() -> int:
    """Serve stdin/stdout. The real stdout is kept for the protocol; fd 1 is pointed at stderr."""
    protocol_out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from ..cli import quiet_third_party_logs

    quiet_third_party_logs()
    WorkerServer(JsonLinesSink(protocol_out)).serve(sys.stdin)
    return 0
