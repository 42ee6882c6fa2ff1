"""The worker process: one loaded engine, requests in, events out to a sink.

:class:`WorkerServer` does not know how events travel. It hands each one to its *sink*,
a callable ``sink(request_id, event)`` (:class:`~.protocol.Event`). The contract:

- it is called from several threads (the reader answers quick ops and refusals, the work
  thread streams work, the heartbeat thread beats), so it must be thread-safe, and it
  should not block for long (a blocked sink stalls the work and the heartbeat);
- events of one request arrive in order, and every request handed to :meth:`handle` gets
  exactly one final event (``done`` or ``error``), also when :meth:`close` cancels it;
- ``request_id`` is None for events that belong to no request: refusals of a line with no
  usable id, and the ``heartbeat`` (``data={"pid": ...}``) every ``heartbeat_s`` seconds.

:class:`JsonLinesSink` writes events as lines on stdout (``python -m RadFMSlicer.worker``).
Another transport supplies its own sink, calls :meth:`WorkerServer.start`, feeds parsed
requests to :meth:`WorkerServer.handle` and calls :meth:`WorkerServer.close` at the end.

stdout carries only the protocol (anything else a library prints goes to stderr). Work
(load, encode, ask, unload) is served one request at a time in arrival order; hello,
status, cancel and shutdown are answered at once. An answer generated elsewhere (a vLLM
server: ``runs_elsewhere``) streams on a thread of its own once its images are encoded, so
the next request is encoded while vLLM writes, and vLLM batches the answers in flight.
Nothing a request holds (wrong types, 100,000-deep JSON, invalid UTF-8) ends the process
or its work thread: it gets an error event naming the problem and the worker keeps
serving. When the input ends or on shutdown, queued work is cancelled (each with its final
event), the running requests are cancelled, and the process exits. It also exits when the program that started it is gone.
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
from .protocol import (HEARTBEAT, MAX_LINE_BYTES, PROTOCOL_VERSION, WORK_OPS, Event, RequestError,
                       ask_request_from_json, check_envelope, check_fields, is_request_id)

HEARTBEAT_S = 1.0
PARENT_POLL_S = 0.5


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
    SHUTDOWN_WAIT_S = 5.0  # for the running request to end after a cancel, before the process exits anyway

    def __init__(self, sink, heartbeat_s: float = HEARTBEAT_S):
        self.sink = sink
        self.heartbeat_s = heartbeat_s
        self._jobs: "queue.Queue[tuple[dict, object] | None]" = queue.Queue()  # (request, its AskRequest or None)
        self._live: dict = {}  # id -> op of every queued or running work request
        self._cancelled: set = set()  # live ids cancelled before they could stop themselves
        self._current_id = None  # the request on the work thread
        self._generations: dict = {}  # id -> generation of every answer being written
        self._streams: dict = {}  # id -> thread streaming an answer generated elsewhere (vLLM)
        self._state_lock = threading.Lock()
        self._stopped = threading.Event()
        self._work_thread = threading.Thread(target=self._work_loop, name="radfm-work", daemon=True)
        self.engine = None
        self.images = ImageCache()  # scans and model images of recent questions: follow-ups reuse them

    def emit(self, request_id, kind: str, text: str = "", /, **data) -> None:
        self.sink(request_id, Event(kind, text, data))

    # --- input ----------------------------------------------------------------------------
    def serve(self, stream) -> None:
        """Handle request lines from a binary stream until it ends or a shutdown request."""
        if not self._work_thread.is_alive():
            self.start()
        for line in request_lines(stream):
            if line is None:
                self.emit(None, "error", f"malformed request: a line longer than {MAX_LINE_BYTES:,} bytes",
                          kind="protocol")
                continue
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except RecursionError:
                self.emit(None, "error", "malformed request: JSON nested too deeply", kind="protocol")
                continue
            except ValueError as exc:
                self.emit(None, "error", f"malformed request: {exc}", kind="protocol")
                continue
            if not self.handle(request):
                break
        self.close()

    def start(self) -> None:
        """Start the work thread and the heartbeat (a thread of its own: a long GPU step still beats)."""
        self._work_thread.start()
        if self.heartbeat_s > 0:
            threading.Thread(target=self._beat, name="radfm-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        beat = Event(HEARTBEAT, data={"pid": os.getpid()})  # the pid names the model process below a launcher
        try:
            self.sink(None, beat)
            while not self._stopped.wait(self.heartbeat_s):
                self.sink(None, beat)
        except (OSError, ValueError):
            pass  # the output is gone: the reader's end of input stops the process

    def handle(self, request) -> bool:
        """Check a parsed request, answer quick ops now, queue work; False means stop reading."""
        rid = request.get("id") if isinstance(request, dict) and is_request_id(request.get("id")) else None
        try:
            check_envelope(request)
            op = request["op"]
            if op in WORK_OPS:
                check_fields(request)
        except RequestError as exc:
            self.emit(rid, "error", f"malformed request: {exc}", kind="protocol")
            return True
        ask_request = None
        if op in ("ask", "encode"):  # a missing scan or a bad window is said now, not after a queued load
            from ..ask import validate

            try:
                ask_request = ask_request_from_json(request)  # parsed once: the op uses this one
                validate(ask_request)
            except RadFMError as exc:
                self.emit(rid, "error", str(exc), kind=type(exc).__name__)
                return True
        if op == "hello":
            self.emit(rid, "done", "RadFMSlicer worker", version=__version__, protocol=PROTOCOL_VERSION, pid=os.getpid())
        elif op == "status":
            self.emit(rid, "done", "status", **self.status())
        elif op == "cancel":
            target = request.get("target")
            if self.cancel(target):
                self.emit(rid, "done", "cancel requested", target=target, matched=True)
            else:
                self.emit(rid, "done", f"nothing to cancel: no queued or running request has id {target!r}",
                          target=target, matched=False)
        elif op == "shutdown":
            self.emit(rid, "done", "bye")
            return False
        else:
            with self._state_lock:
                duplicate, closing = rid in self._live, self._stopped.is_set()
                if not (duplicate or closing):
                    self._live[rid] = op
                    self._jobs.put((request, ask_request))
            if duplicate:
                self.emit(rid, "error", f"request id {rid!r} is already in use by a request that has not finished; "
                                        "use a new id", kind="protocol")
            elif closing:
                self.emit(rid, "error", "the worker is shutting down", kind="shutdown")
        return True

    def cancel(self, target) -> bool:
        """Cancel a queued or running request; False (and nothing remembered) if none has that id."""
        with self._state_lock:
            if target not in self._live:
                return False
            if target in self._generations:
                self._generations[target].cancel()
            else:
                self._cancelled.add(target)  # checked when it starts, or when its generation starts
            return True

    def close(self) -> None:
        """End of input: cancel queued work (each gets its final event), stop the running one, stop."""
        with self._state_lock:
            self._stopped.set()
            queued = []
            while True:
                try:
                    request, _ = self._jobs.get_nowait()
                except queue.Empty:
                    break
                queued.append(request)
                self._live.pop(request.get("id"), None)
            for generation in self._generations.values():
                generation.cancel()
            streams = list(self._streams.values())
        for request in queued:
            self.emit(request.get("id"), "done", "cancelled: the worker is shutting down", answer="",
                      stop_reason="cancelled")
        self._jobs.put(None)
        deadline = time.monotonic() + self.SHUTDOWN_WAIT_S
        for thread in [self._work_thread, *streams]:
            if thread.is_alive():
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._state_lock:
            running = any(thread.is_alive() for thread in [self._work_thread, *self._streams.values()])
            unfinished = list(self._live.items()) if running else []
        for rid, op in unfinished:
            self.emit(rid, "error", f"the worker shut down before this {op} finished", kind="shutdown")

    @property
    def finished(self) -> bool:
        """True once close() left no work running (else the process should exit without waiting)."""
        with self._state_lock:  # a stream's thread removes itself as it ends
            threads = [self._work_thread, *self._streams.values()]
        return self._stopped.is_set() and not any(thread.is_alive() for thread in threads)

    def status(self) -> dict:
        import psutil
        import torch

        memory = {"rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}
        if torch.cuda.is_available():
            memory["cuda_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
            memory["cuda_reserved_mb"] = round(torch.cuda.memory_reserved() / 2**20, 1)
        return {"loaded": self.engine is not None, "model": self.engine.describe() if self.engine else None,
                "busy": self._current_id is not None or bool(self._generations),
                "answering": len(self._generations), "memory": memory, "pid": os.getpid()}

    # --- work -----------------------------------------------------------------------------
    def _work_loop(self) -> None:
        """Serve work in order; nothing a request holds may end this thread (hello would still answer)."""
        while (job := self._jobs.get()) is not None:
            request, ask_request = job
            rid = request.get("id")
            try:
                self._run(rid, request, ask_request)
            except Exception:  # the sink itself failed (stdout gone): nothing left to tell
                traceback.print_exc(file=sys.stderr)
            finally:
                with self._state_lock:
                    self._current_id = None
                    if rid not in self._streams:  # a streaming answer is forgotten when its stream ends
                        self._forget(rid)

    def _forget(self, rid) -> None:
        """The request has had its final event (call under the state lock)."""
        self._live.pop(rid, None)
        self._cancelled.discard(rid)
        self._generations.pop(rid, None)
        self._streams.pop(rid, None)

    def _run(self, rid, request, ask_request=None) -> None:
        with self._state_lock:
            if rid in self._cancelled:
                self.emit(rid, "done", "", answer="", stop_reason="cancelled")
                return
            self._current_id = rid
        op = getattr(self, "op_" + request["op"])
        self._reporting_errors(rid, op, rid, request, *([] if ask_request is None else [ask_request]))

    def _reporting_errors(self, rid, work, *args) -> None:
        """Run ``work(*args)``; a failure becomes the request's error event, and serving goes on."""
        try:
            work(*args)
        except RadFMError as exc:
            self.emit(rid, "error", str(exc), kind=type(exc).__name__)
        except Exception as exc:  # keep serving: report the bug with its traceback on stderr
            traceback.print_exc(file=sys.stderr)
            self.emit(rid, "error", f"internal error: {type(exc).__name__}: {str(exc)[:500]}", kind="internal")

    def op_load(self, rid, request) -> None:
        from ..engine import RadFMEngine

        args = {k: request.get(k) for k in ("checkpoint", "device", "dtype", "quantization", "compile_decode",
                                            "vllm_url")}
        if not args["checkpoint"]:
            raise RadFMError("load needs a 'checkpoint' folder")
        self.emit(rid, "status", f"loading model from {args['checkpoint']}")
        start = time.perf_counter()
        try:  # the model loaded before stays in use until the new one is in
            engine = RadFMEngine.load(args["checkpoint"], device=args["device"] or "cpu", dtype=args["dtype"],
                                      quantization=args["quantization"],
                                      compile_decode=bool(args["compile_decode"]), vllm_url=args["vllm_url"])
        except RadFMError as exc:
            if self.engine is None:
                raise
            raise RadFMError(f"{exc} (the model loaded before, {self.engine.describe().get('checkpoint')}, "
                            "is still loaded)") from exc
        self.engine = engine
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

    def op_encode(self, rid, request, ask_request=None) -> None:
        """Encode ahead of a question: the same tensors an ``ask`` with these fields would make.

        ``ask_request``: the request's fields as :func:`handle` parsed them (parsed here when not given)."""
        engine = self._require_engine()
        if ask_request is None:
            ask_request = ask_request_from_json(request)
        records = []
        for item in ask_request.images:
            self.emit(rid, "status", f"encoding {item.name or item.path}")
            _, image = self.images.load(ask_request, item, engine.device)
            engine.encode_images([image])
            records.append(image.to_dict())
        self.emit(rid, "done", f"{len(records)} image(s) encoded", images=records)

    def op_ask(self, rid, request, ask_request=None) -> None:
        """Answer a question; ``ask_request`` as in :meth:`op_encode`."""
        from ..ask import prepare, start, write_previews
        from ..session import Session

        engine = self._require_engine()
        if ask_request is None:
            ask_request = ask_request_from_json(request)
        preview_dir, ask_request.preview_dir = ask_request.preview_dir, None  # drawn after the answer, not before
        session = Session()
        for question, answer in request.get("previous_turns") or []:
            session.add_turn({"task": "vqa", "question": question, "answer": answer})
        self.emit(rid, "status", "preparing and encoding images")
        t0 = time.perf_counter()
        prepared = attention = None
        if request.get("attention"):  # the map comes from the encoding pass the answer then reuses
            from ..attention import write_npy_for_ask

            prepared = prepare(ask_request, session, engine.model.dims.num_latents, self.images, engine.device)
            attention = write_npy_for_ask(engine, prepared, preview_dir)
        prepared, generation = start(engine, ask_request, session, self.images, prepared=prepared)
        prepare_s = time.perf_counter() - t0
        with self._state_lock:
            self._generations[rid] = generation
            if rid in self._cancelled:
                generation.cancel()
        if generation.runs_elsewhere:  # vLLM writes it: the work thread goes on to the next request
            if preview_dir:  # the image cache is the work thread's: drawn here, before the answer
                write_previews(prepared, preview_dir, self.images)
            answer = (rid, engine, ask_request, prepared, generation, prepare_s, attention)
            stream = threading.Thread(target=self._stream_elsewhere, args=answer, name="radfm-answer", daemon=True)
            with self._state_lock:
                self._streams[rid] = stream
            stream.start()
            return
        self._write_answer(rid, engine, ask_request, prepared, generation, prepare_s, attention, preview_dir)

    def _write_answer(self, rid, engine, ask_request, prepared, generation, prepare_s, attention,
                      preview_dir=None) -> None:
        """Stream the answer's tokens, then its done event with the turn (previews drawn in between)."""
        from ..ask import make_turn, write_previews

        self.emit(rid, "status", "generating")
        for delta in generation:
            self.emit(rid, "token", delta)
        result = generation.result
        if preview_dir:
            write_previews(prepared, preview_dir, self.images)
        turn = make_turn(engine, ask_request, prepared, result, prepare_s)
        if attention:
            turn.provenance["attention"] = attention
        self.emit(rid, "done", result.text, answer=result.text, stop_reason=result.stop_reason, turn=turn.to_dict())

    def _stream_elsewhere(self, rid, *answer) -> None:
        """An answer generated elsewhere, on its own thread: :meth:`_write_answer`, then forgotten."""
        try:
            self._reporting_errors(rid, self._write_answer, rid, *answer)
        except Exception:  # the sink itself failed (stdout gone): nothing left to tell
            traceback.print_exc(file=sys.stderr)
        finally:
            with self._state_lock:
                self._forget(rid)


def request_lines(stream, limit: int = MAX_LINE_BYTES):
    """Lines of a binary stream, decoded leniently (a bad byte becomes U+FFFD); None for an overlong line."""
    while raw := stream.readline(limit + 1):
        if len(raw) > limit and not raw.endswith(b"\n"):
            while (rest := stream.readline(limit + 1)) and not rest.endswith(b"\n"):
                pass
            yield None
            continue
        yield raw.decode("utf-8", errors="replace")


def watch_parent(parent_pid: int | None) -> None:
    """Exit when the process that started us is gone, even if a forked child still holds our stdin.

    Polled, not a Linux parent-death signal: PR_SET_PDEATHSIG fires when the *thread* that
    started the worker ends, and the Slicer panel starts it from a short-lived thread.
    """
    from ..storage import process_exists

    first_ppid = os.getppid()

    def poll():
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != first_ppid or (parent_pid and not process_exists(parent_pid)):
                print("RadFM worker: the program that started it is gone; exiting", file=sys.stderr, flush=True)
                os._exit(0)

    threading.Thread(target=poll, name="radfm-parent-watch", daemon=True).start()


def main(argv=None) -> int:
    """Serve stdin/stdout. The real stdout is kept for the protocol; fd 1 is pointed at stderr."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m RadFMSlicer.worker")
    parser.add_argument("--heartbeat-s", type=float, default=HEARTBEAT_S, help="0 = no heartbeat")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    args = parser.parse_args(argv)
    protocol_out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    watch_parent(args.parent_pid)
    server = WorkerServer(JsonLinesSink(protocol_out), heartbeat_s=args.heartbeat_s)
    server.start()  # beating before the slow imports below
    from ..cli import quiet_third_party_logs

    quiet_third_party_logs()
    server.serve(sys.stdin.buffer)
    if not server.finished:  # a load that cannot be cancelled: do not wait for it, nor let it abort the exit
        sys.stderr.flush()
        os._exit(0)
    return 0
