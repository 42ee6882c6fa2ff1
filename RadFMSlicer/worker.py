"""An isolated, long-lived inference process and the client that talks to it.

``python -m RadFMSlicer.worker`` holds one loaded engine and serves JSON lines on
stdin/stdout: one request per line ``{"id": ..., "op": ..., ...}``; every reply and
streamed event is a line ``{"id": ..., "event": "status"|"token"|"done"|"error", "text": ...,
"data": {...}}`` carrying the request id. stdout carries only the protocol (anything
else a library prints goes to stderr). Work (load, encode, ask, unload) is served one
request at a time in arrival order; hello, status, cancel and shutdown are answered at
once. A failing request gets an error reply and the worker keeps serving. When stdin
closes (the client went away) the worker cancels what it is doing and exits.

Keeping the model in its own process means a CUDA error or an out-of-memory kill ends
this process, not the Slicer session that asked; :class:`WorkerClient` then reports the
failure and starts a fresh worker, reloading the last model, on the next request.
"""

import collections
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field

from . import __version__
from .errors import RadFMError

PROTOCOL_VERSION = 1
WORK_OPS = {"load", "encode", "ask", "unload"}


# =============================================================================== server
class WorkerServer:
    def __init__(self, out):
        self._out = out
        self._write_lock = threading.Lock()
        self._jobs: "queue.Queue[dict | None]" = queue.Queue()
        self._cancelled: set[str] = set()
        self._current_id: str | None = None
        self._current_generation = None
        self._state_lock = threading.Lock()
        self.engine = None
        self.load_args: dict | None = None

    # --- output ---------------------------------------------------------------------------
    def send(self, request_id, event: str, text: str = "", **data) -> None:
        line = json.dumps({"id": request_id, "event": event, "text": text, "data": data})
        with self._write_lock:
            self._out.write(line + "\n")
            self._out.flush()

    # --- input ----------------------------------------------------------------------------
    def serve(self, lines) -> None:
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
                self.send(None, "error", f"malformed request: {exc}", kind="protocol")
                continue
            if not self._dispatch(request):
                break
        self._cancel_everything()
        self._jobs.put(None)
        worker.join(timeout=10)

    def _dispatch(self, request: dict) -> bool:
        """Answer quick ops now, queue work; False means stop reading."""
        rid, op = request.get("id"), request["op"]
        if op == "hello":
            self.send(rid, "done", "RadFMSlicer worker", version=__version__, protocol=PROTOCOL_VERSION, pid=os.getpid())
        elif op == "status":
            self.send(rid, "done", "status", **self.status())
        elif op == "cancel":
            self.cancel(request.get("target"))
            self.send(rid, "done", "cancel requested", target=request.get("target"))
        elif op == "shutdown":
            self.send(rid, "done", "bye")
            return False
        elif op in WORK_OPS:
            self._jobs.put(request)
        else:
            self.send(rid, "error", f"unknown op {op!r}; known: hello, status, load, encode, ask, cancel, unload, shutdown")
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
                    self.send(rid, "done", "", answer="", stop_reason="cancelled")
                    continue
                self._current_id = rid
            try:
                getattr(self, "op_" + request["op"])(rid, request)
            except RadFMError as exc:
                self.send(rid, "error", str(exc), kind=type(exc).__name__)
            except Exception as exc:  # keep serving: report the bug with its traceback on stderr
                traceback.print_exc(file=sys.stderr)
                self.send(rid, "error", f"internal error: {type(exc).__name__}: {exc}", kind="internal")
            finally:
                with self._state_lock:
                    self._current_id, self._current_generation = None, None

    def op_load(self, rid, request) -> None:
        from .engine import RadFMEngine

        args = {k: request.get(k) for k in ("checkpoint", "device", "dtype", "quantization", "compile_decode")}
        if not args["checkpoint"]:
            raise RadFMError("load needs a 'checkpoint' folder")
        self.send(rid, "status", f"loading model from {args['checkpoint']}")
        self.engine = None
        start = time.perf_counter()
        self.engine = RadFMEngine.load(args["checkpoint"], device=args["device"] or "cpu", dtype=args["dtype"],
                                       quantization=args["quantization"],
                                       compile_decode=bool(args["compile_decode"]))
        self.load_args = args
        self.send(rid, "done", "model loaded", model=self.engine.describe(),
                  load_s=round(time.perf_counter() - start, 2))

    def op_unload(self, rid, request) -> None:
        import gc

        import torch

        self.engine = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.send(rid, "done", "model unloaded")

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
            self.send(rid, "status", f"encoding {item.name or item.path}")
            image = ask_request.model_image(item, item.load())
            engine.encode_images([image.tensor])
            records.append(image.to_dict())
        self.send(rid, "done", f"{len(records)} image(s) encoded", images=records)

    def op_ask(self, rid, request) -> None:
        from .ask import make_turn, start
        from .session import Session

        engine = self._require_engine()
        ask_request = ask_request_from_json(request)
        session = Session()
        for question, answer in request.get("previous_turns") or []:
            session.add_turn({"task": "vqa", "question": question, "answer": answer})
        self.send(rid, "status", "preparing and encoding images")
        t0 = time.perf_counter()
        prepared, generation = start(engine, ask_request, session)
        prepare_s = time.perf_counter() - t0
        with self._state_lock:
            self._current_generation = generation
            if rid in self._cancelled:
                generation.cancel()
        self.send(rid, "status", "generating")
        for delta in generation:
            self.send(rid, "token", delta)
        result = generation.result
        turn = make_turn(engine, ask_request, prepared, result, prepare_s)
        self.send(rid, "done", result.text, answer=result.text, stop_reason=result.stop_reason, turn=turn.to_dict())


def ask_request_from_json(request: dict):
    """An AskRequest from the fields of an ``ask`` line."""
    from .ask import AskRequest, ImageInput, RegionInput
    from .generation import GenerationSettings

    settings_keys = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
    settings = GenerationSettings(**{k: request[k] for k in settings_keys if request.get(k) is not None})
    window = request.get("window")
    return AskRequest(
        task=request.get("task") or ("vqa" if request.get("question") else "report"),
        question=request.get("question"),
        images=[ImageInput.from_json(i) for i in request.get("images") or []],
        regions=[RegionInput.from_json(r) for r in request.get("regions") or []],
        history=request.get("history"),
        window=",".join(str(v) for v in window) if isinstance(window, (list, tuple)) else window,
        interpolation=request.get("interpolation") or "nearest",
        settings=settings,
        include_previous_turns=bool(request.get("previous_turns")),
        preview_dir=request.get("preview_dir"),
    )


def main() -> int:
    """Serve stdin/stdout. The real stdout is kept for the protocol; fd 1 is pointed at stderr."""
    protocol_out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from .cli import quiet_third_party_logs

    quiet_third_party_logs()
    WorkerServer(protocol_out).serve(sys.stdin)
    return 0


# =============================================================================== client
class WorkerError(RuntimeError):
    """The worker answered with an error, or died; the message says which and why."""


@dataclass
class Event:
    kind: str  # "status", "token", "done" or "error"
    text: str = ""
    data: dict = field(default_factory=dict)


class Request:
    """One request to the worker: its events arrive on a queue, read by ``poll`` or ``events``."""

    def __init__(self, client: "WorkerClient", request_id: str, op: str):
        self.client = client
        self.id = request_id
        self.op = op
        self._events: "queue.Queue[Event]" = queue.Queue()
        self.finished = False
        self.final: Event | None = None

    def _push(self, event: Event) -> None:
        self._events.put(event)

    def poll(self) -> list[Event]:
        """Events that arrived so far, without blocking (for a GUI timer)."""
        out = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return out
            out.append(self._note(event))

    def _note(self, event: Event) -> Event:
        if event.kind in ("done", "error"):
            self.finished, self.final = True, event
        return event

    def events(self, timeout: float = 60.0):
        """Yield events until done or error; an error event if nothing arrives for ``timeout`` s."""
        while not self.finished:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                event = Event("error", f"no answer from the worker for {timeout:g} s", {"kind": "timeout"})
            yield self._note(event)

    def wait(self, timeout: float = 600.0) -> Event:
        for event in self.events(timeout):
            pass
        return self.final

    def result(self, timeout: float = 600.0) -> dict:
        """The done event's data; raises WorkerError for an error."""
        final = self.wait(timeout)
        if final.kind == "error":
            raise WorkerError(final.text)
        return final.data

    def cancel(self) -> None:
        if not self.finished:
            self.client.send("cancel", target=self.id)


class WorkerClient:
    """Starts and talks to a worker process; restarts it (and reloads the model) after a crash."""

    STDERR_LINES = 40

    def __init__(self, python: str | None = None, preview_dir: str | None = None, env: dict | None = None):
        self.python = python or sys.executable
        self.env = env
        self.preview_dir = preview_dir or tempfile.mkdtemp(prefix="radfm-previews-")
        self._ids = itertools.count(1)
        self._pending: dict[str, Request] = {}
        self._lock = threading.Lock()
        self._stderr = collections.deque(maxlen=self.STDERR_LINES)
        self._history: list[tuple[str, str]] = []
        self.load_args: dict | None = None
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    @classmethod
    def start(cls, python: str | None = None, **kwargs) -> "WorkerClient":
        client = cls(python, **kwargs)
        client._spawn()
        return client

    # --- process --------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self) -> None:
        env = dict(os.environ if self.env is None else self.env)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            self.proc = subprocess.Popen(
                [self.python, "-m", "RadFMSlicer.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, encoding="utf-8", bufsize=1, env=env,
            )
        except OSError as exc:
            raise WorkerError(f"cannot start the worker with {self.python}: {exc}") from exc
        proc = self.proc
        threading.Thread(target=self._read_stdout, args=(proc,), name="radfm-client-out", daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(proc,), name="radfm-client-err", daemon=True).start()

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                self._stderr.append(f"(stdout) {line.rstrip()}")
                continue
            with self._lock:
                request = self._pending.get(message.get("id"))
            if request is None:
                continue
            event = Event(message.get("event", "error"), message.get("text", ""), message.get("data") or {})
            if event.kind in ("done", "error"):
                with self._lock:
                    self._pending.pop(request.id, None)
                if event.kind == "done" and request.op == "ask" and event.data.get("answer"):
                    self._history.append((event.data["turn"]["question"], event.data["answer"]))
            request._push(event)
        self._worker_died(proc)

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self._stderr.append(line.rstrip())

    def _worker_died(self, proc: subprocess.Popen) -> None:
        """stdout closed: fail every pending request of that process with the cause."""
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        time.sleep(0.1)  # let the stderr reader catch the last lines
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            cause = f"killed by {name}" + (" (out of memory, or killed by hand)" if -code == signal.SIGKILL else "")
        else:
            cause = f"exited with status {code}"
        tail = "\n".join(list(self._stderr)[-8:])
        with self._lock:
            orphans = [r for r in self._pending.values() if r.client is self]
            self._pending.clear()
        for request in orphans:
            request._push(Event("error", f"the RadFM worker {cause}. Last messages:\n{tail}".rstrip(),
                                {"kind": "worker_died", "exit_code": code}))

    def send(self, op: str, **params) -> Request:
        """Send a request; a dead worker is restarted first (reloading the last model)."""
        if not self.alive():
            if self.proc is None:
                raise WorkerError("the worker client is closed")
            self._restart()
        return self._send(op, **params)

    def _send(self, op: str, **params) -> Request:
        request = Request(self, f"r{next(self._ids)}", op)
        with self._lock:
            self._pending[request.id] = request
        line = json.dumps({"id": request.id, "op": op, **params})
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the stdout reader reports the death to this request
        return request

    def _restart(self) -> None:
        self.restarts += 1
        self._spawn()
        if self.load_args:
            self._send("load", **self.load_args)  # queued ahead of the request that follows

    # --- API --------------------------------------------------------------------------------
    def hello(self, timeout: float = 60) -> dict:
        return self.send("hello").result(timeout)

    def load(self, folder, device: str = "cpu", dtype: str | None = None, quantization: str | None = None,
             compile_decode: bool = False, timeout: float = 3600) -> dict:
        """Load a checkpoint in the worker; blocks; raises WorkerError with the worker's message."""
        args = {"checkpoint": str(folder), "device": device, "dtype": dtype, "quantization": quantization,
                "compile_decode": compile_decode}
        data = self.send("load", **args).result(timeout)
        self.load_args = args
        return data

    def ask(self, question: str | None = None, images=(), task: str | None = None, regions=(), history=None,
            window=None, max_new_tokens: int = 256, include_previous_turns: bool = False,
            previous_turns=None, **settings) -> Request:
        """Start an answer; returns at once. Iterate ``req.events()`` or ``req.poll()``."""
        if include_previous_turns and previous_turns is None:
            previous_turns = self._history[-3:]
        return self.send("ask", task=task, question=question, images=list(images), regions=list(regions),
                         history=history, window=window, max_new_tokens=max_new_tokens,
                         previous_turns=[list(t) for t in previous_turns or []] if include_previous_turns else None,
                         preview_dir=self.preview_dir, **settings)

    def encode(self, images, window=None) -> Request:
        return self.send("encode", images=list(images), window=window)

    def status(self, timeout: float = 30) -> dict:
        return self.send("status").result(timeout)

    def unload(self, timeout: float = 60) -> dict:
        self.load_args = None
        return self.send("unload").result(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker (politely, then by force); leaves no process behind."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.stdin.write(json.dumps({"id": "close", "op": "shutdown"}) + "\n")
                proc.stdin.flush()
                proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stderr_tail(self) -> list[str]:
        return list(self._stderr)

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
