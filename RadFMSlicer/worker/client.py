"""The client side: start a worker process, send requests, read their events."""

import collections
import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref

from .protocol import HEARTBEAT, Event


class WorkerError(RuntimeError):
    """The worker answered with an error, or died; the message says which and why."""


class Request:
    """One request to the worker: its events arrive on a queue, read by ``poll`` or ``events``."""

    def __init__(self, client: "WorkerClient", request_id: str, op: str):
        self.client = client
        self.id = request_id
        self.op = op
        self.worker = None  # the process it was sent to
        self._events: "queue.Queue[Event]" = queue.Queue()
        self.finished = False
        self.final: Event | None = None

    def push(self, event: Event) -> None:
        """Deliver an event to whoever reads this request (the client's reader threads call it)."""
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
        if event.final:
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
            self.client._cancel(self)


DEFAULT_HANG_TIMEOUT_S = 300.0  # silence (no event, no heartbeat) after which a worker counts as hung


class _Worker:
    """One started process (the worker, or a launcher running it as a child) and its requests."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.pending: dict[str, Request] = {}
        self.outbox: "queue.Queue[bytes | None]" = queue.Queue()  # written by a thread: a full pipe never blocks
        self.last_heard = time.monotonic()
        self.worker_pid: int | None = None  # the process that runs the model (from its heartbeat)
        self.ended_by: str | None = None  # why we ended it ourselves (hang, close)
        self.done = threading.Event()  # its output ended and its requests got their final event

    def alive(self) -> bool:
        return not self.done.is_set() and self.ended_by is None and self.popen.poll() is None

    def tree(self) -> list:
        """The started process, everything under it, and the model process even if it was re-parented."""
        import psutil

        procs = []
        try:
            root = psutil.Process(self.popen.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
        if self.worker_pid and self.worker_pid not in {p.pid for p in procs}:
            try:
                procs.append(psutil.Process(self.worker_pid))
            except psutil.NoSuchProcess:
                pass
        return procs


def end_tree(procs, timeout: float = 3.0) -> None:
    """Kill every process of a worker's tree and wait for them (SIGKILL also ends a stopped one)."""
    import psutil

    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


def _line(message: dict) -> bytes:
    return (json.dumps(message) + "\n").encode("utf-8")


HISTORY_TURNS = 3  # the answered turns a client keeps: an ask with include_previous_turns sends these


def answer_history() -> "collections.deque[tuple[str, str]]":
    """A client's answered (question, answer) pairs; only the last HISTORY_TURNS are ever sent, so only they are kept
    (a long-lived client, the one ``radfm serve`` shares between readers, would otherwise keep every answer)."""
    return collections.deque(maxlen=HISTORY_TURNS)


def previous_turns_param(include: bool, given, history) -> list | None:
    """The ``previous_turns`` an ask sends: the given pairs, else the client's history; None when not asked for."""
    if not include:
        return None
    return [list(t) for t in (list(history) if given is None else given) or []]


def _popen_options() -> dict:
    """On Windows, no console window pops up for the worker (as slicer.util.launchConsoleProcess)."""
    if os.name != "nt":
        return {}
    info = subprocess.STARTUPINFO()
    info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
    info.wShowWindow = subprocess.SW_HIDE
    return {"startupinfo": info, "creationflags": subprocess.CREATE_NO_WINDOW}


class WorkerClient:
    """Starts and talks to a worker process; restarts it (and reloads the model) after a crash or a hang.

    ``hang_timeout``: seconds without any line from the worker (it sends a heartbeat every
    second from a thread of its own, so a long GPU step is not silence) after which it is
    reported as hung to every pending request, ended with its whole process tree, and
    restarted on the next request. ``on_stderr(line)`` gets each line the worker writes on
    stderr, on a reader thread (the panel's log pane). Thumbnails and attention maps go to
    ``preview_dir``; without one, to a temp folder of the client's own that goes when it
    closes (move out what you keep).
    """

    STDERR_LINES = 40

    def __init__(self, python: str | None = None, preview_dir: str | None = None, env: dict | None = None,
                 hang_timeout: float = DEFAULT_HANG_TIMEOUT_S, on_stderr=None):
        self.python = python or sys.executable
        self.env = env
        self.preview_dir = preview_dir or tempfile.mkdtemp(prefix="radfm-previews-")
        # A folder of our own goes on close(), or when the client is dropped or Python exits without that.
        self._remove_previews = (weakref.finalize(self, shutil.rmtree, self.preview_dir, ignore_errors=True)
                                 if preview_dir is None else None)
        self.hang_timeout = hang_timeout
        self.on_stderr = on_stderr  # called with each stderr line, on the reader thread (the panel's log pane)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # pending requests of every worker
        self._restart_lock = threading.Lock()  # one start or restart at a time, whoever sends
        self._stderr = collections.deque(maxlen=self.STDERR_LINES)
        self._history = answer_history()
        self._worker: _Worker | None = None
        self._workers: list[_Worker] = []  # every process started and not yet ended
        self._closed = False
        self.load_args: dict | None = None
        self.restarts = 0

    @classmethod
    def start(cls, python: str | None = None, **kwargs) -> "WorkerClient":
        client = cls(python, **kwargs)
        with client._restart_lock:
            client._spawn()
        return client

    # --- process --------------------------------------------------------------------------
    @property
    def proc(self) -> subprocess.Popen | None:
        return self._worker.popen if self._worker else None

    @property
    def pid(self) -> int | None:
        """The process running the model (below a launcher, if one sits in between)."""
        worker = self._worker
        if worker is None:
            return None
        if worker.worker_pid is None:
            deadline = time.monotonic() + 10
            while worker.worker_pid is None and worker.alive() and time.monotonic() < deadline:
                time.sleep(0.02)  # its first heartbeat names it
        return worker.worker_pid or worker.popen.pid

    def alive(self) -> bool:
        return self._worker is not None and self._worker.alive()

    def _spawn(self) -> None:
        env = dict(os.environ if self.env is None else self.env)
        if os.path.abspath(self.python) != os.path.abspath(sys.executable):
            # Another Python (Model settings' worker Python): the home and path Slicer's launcher
            # sets for its own Python would make it fail to start ("No module named 'encodings'").
            env.pop("PYTHONHOME", None)
            env.pop("PYTHONPATH", None)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        heartbeat_s = min(1.0, self.hang_timeout / 5)
        command = [self.python, "-m", "RadFMSlicer.worker", "--heartbeat-s", f"{heartbeat_s:g}",
                   "--parent-pid", str(os.getpid())]
        try:
            popen = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, **_popen_options())
        except OSError as exc:
            raise WorkerError(f"cannot start the worker with {self.python}: {exc}") from exc
        worker = _Worker(popen)
        self._worker = worker
        self._workers.append(worker)
        for target, name in ((self._read_stdout, "out"), (self._read_stderr, "err"), (self._write, "in"),
                             (self._watch, "watch")):
            threading.Thread(target=target, args=(worker,), name=f"radfm-client-{name}", daemon=True).start()

    def _write(self, worker: _Worker) -> None:
        while (data := worker.outbox.get()) is not None:
            try:
                worker.popen.stdin.write(data)
                worker.popen.stdin.flush()
            except (OSError, ValueError):
                return  # the stdout reader reports the death
        try:
            worker.popen.stdin.close()
        except (OSError, ValueError):
            pass

    def _watch(self, worker: _Worker) -> None:
        """End a worker that has been silent for ``hang_timeout`` s (stopped, deadlocked, stuck in a driver)."""
        while not worker.done.wait(min(1.0, self.hang_timeout / 4)):
            silent = time.monotonic() - worker.last_heard
            if silent > self.hang_timeout and worker.ended_by is None:
                worker.ended_by = (f"stopped responding for {silent:.0f} s (a stuck GPU call or a deadlock) and was "
                                   "ended; it restarts on the next request")
                end_tree(worker.tree())
                return

    def _read_stdout(self, worker: _Worker) -> None:
        for raw in worker.popen.stdout:
            worker.last_heard = time.monotonic()
            line = raw.decode("utf-8", errors="replace")
            try:
                message = json.loads(line)
            except (ValueError, RecursionError):
                message = None
            if not isinstance(message, dict) or not isinstance(message.get("id"), (str, type(None))):
                self._stderr.append(f"(stdout) {line.rstrip()[:500]}")
                continue
            event = Event.from_message(message)
            if event.kind == HEARTBEAT:
                worker.worker_pid = event.data.get("pid", worker.worker_pid)
                continue
            with self._lock:
                request = worker.pending.get(message.get("id"))
                if request is not None and event.final:
                    del worker.pending[request.id]
            if request is None:
                continue
            if event.kind == "done" and request.op == "ask" and event.data.get("answer"):
                self._history.append((event.data["turn"]["question"], event.data["answer"]))
            request.push(event)
        self._worker_died(worker)

    def _read_stderr(self, worker: _Worker) -> None:
        """Worker and library messages; a byte that is not UTF-8 is replaced, never fatal (a stalled
        reader would let the pipe fill and freeze the worker)."""
        for raw in worker.popen.stderr:
            line = raw.decode("utf-8", errors="replace").rstrip()
            self._stderr.append(line)
            if self.on_stderr is not None:
                try:
                    self.on_stderr(line)
                except Exception as exc:  # the log pane must not stop the reader
                    self._stderr.append(f"(log callback failed: {type(exc).__name__}: {exc})")

    def _worker_died(self, worker: _Worker) -> None:
        """Its output ended: fail that worker's pending requests (and only those) with the cause."""
        try:
            code = worker.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            end_tree(worker.tree())
            code = worker.popen.wait()
        end_tree(worker.tree())  # a launcher gone, its child not: the model process must not stay behind
        time.sleep(0.1)  # let the stderr reader catch the last lines
        tail = "\n".join(list(self._stderr)[-8:])
        cause = worker.ended_by or self._cause(worker, code, tail)
        with self._lock:
            orphans = list(worker.pending.values())
            worker.pending.clear()
            worker.done.set()  # under the lock: a request sent now is either in orphans or told the worker ended
        for request in orphans:
            request.push(Event("error", f"the RadFM worker {cause}. Last messages:\n{tail}".rstrip(),
                                {"kind": "worker_died", "exit_code": code, "hung": worker.ended_by is not None}))
        with self._restart_lock:
            if worker in self._workers:
                self._workers.remove(worker)

    @staticmethod
    def _cause(worker: _Worker, code: int, tail: str) -> str:
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"was killed by {name}" + (" (out of memory, or killed by hand)" if -code == signal.SIGKILL else "")
        launcher = worker.worker_pid not in (None, worker.popen.pid)
        if launcher and code == 1 and "Traceback" not in tail:
            # a launcher (Slicer's PythonSlicer) turns its child's death by a signal into status 1
            return (f"(pid {worker.worker_pid}) was killed by a signal (out of memory, or killed by hand); "
                    f"its launcher {os.path.basename(worker.popen.args[0])} exited with status 1")
        return f"exited with status {code}"

    def send(self, op: str, **params) -> Request:
        """Send a request; a dead or hung worker is restarted first (once, whoever asks), reloading the last model."""
        with self._restart_lock:
            if self._closed:
                raise WorkerError("the worker client is closed")
            if not self.alive():
                self._restart()
            return self._send_to(self._worker, op, params)

    def _send_to(self, worker: _Worker, op: str, params: dict) -> Request:
        request = Request(self, f"r{next(self._ids)}", op)
        request.worker = worker
        with self._lock:
            dead = worker.done.is_set()
            if not dead:
                worker.pending[request.id] = request
        if dead:
            request.push(Event("error", "the RadFM worker ended before this request reached it",
                                {"kind": "worker_died"}))
        else:
            worker.outbox.put(_line({"id": request.id, "op": op, **params}))
        return request

    def _cancel(self, request: Request) -> None:
        """Cancel on the worker that has the request; a dead one has already failed it."""
        if request.worker.alive():
            request.worker.outbox.put(_line({"id": f"cancel-{request.id}", "op": "cancel", "target": request.id}))

    def _restart(self) -> None:
        self.restarts += 1
        if self._worker is not None and self._worker.popen.poll() is None:
            end_tree(self._worker.tree())
        self._spawn()
        if self.load_args:
            self._send_to(self._worker, "load", self.load_args)  # queued ahead of the request that follows

    # --- API --------------------------------------------------------------------------------
    def hello(self, timeout: float = 60) -> dict:
        return self.send("hello").result(timeout)

    def load(self, folder, device: str = "cpu", dtype: str | None = None, quantization: str | None = None,
             compile_decode: bool = False, vllm_url: str | None = None, timeout: float = 3600) -> dict:
        """Load a checkpoint in the worker; blocks; raises WorkerError with the worker's message.

        ``vllm_url``: the worker keeps the vision half and asks that vLLM server for the tokens.
        """
        args = {"checkpoint": str(folder), "device": device, "dtype": dtype, "quantization": quantization,
                "compile_decode": compile_decode, "vllm_url": vllm_url}
        data = self.send("load", **args).result(timeout)
        self.load_args = args
        return data

    def ask(self, question: str | None = None, images=(), task: str | None = None, regions=(), history=None,
            window=None, max_new_tokens: int = 256, include_previous_turns: bool = False,
            previous_turns=None, **settings) -> Request:
        """Start an answer; returns at once. Iterate ``req.events()`` or ``req.poll()``."""
        return self.send("ask", task=task, question=question, images=list(images), regions=list(regions),
                         history=history, window=window, max_new_tokens=max_new_tokens,
                         previous_turns=previous_turns_param(include_previous_turns, previous_turns, self._history),
                         preview_dir=self.preview_dir, **settings)

    def encode(self, images, window=None) -> Request:
        return self.send("encode", images=list(images), window=window)

    def status(self, timeout: float = 30) -> dict:
        return self.send("status").result(timeout)

    def unload(self, timeout: float = 60) -> dict:
        self.load_args = None
        return self.send("unload").result(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker this client started (politely, then the whole tree by force)."""
        with self._restart_lock:
            self._closed = True
            workers, self._workers, self._worker = list(self._workers), [], None
        for worker in workers:
            tree = worker.tree()
            if worker.alive():
                worker.outbox.put(_line({"id": "close", "op": "shutdown"}))
            worker.ended_by = worker.ended_by or "was stopped (the client closed)"
            worker.outbox.put(None)
            try:
                worker.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            end_tree(tree + worker.tree())
        if self._remove_previews:
            self._remove_previews()

    def stderr_tail(self) -> list[str]:
        return list(self._stderr)

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
