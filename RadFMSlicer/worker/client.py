"""The client side: start a worker process, send requests, read their events."""

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

from .protocol import Event


class WorkerError(RuntimeError):
    """The worker answered with an error, or died; the message says which and why."""


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
        self.on_stderr = None  # called with each stderr line, on the reader thread (the panel's log pane)

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
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
            event = Event.from_message(message)
            if event.final:
                with self._lock:
                    self._pending.pop(request.id, None)
                if event.kind == "done" and request.op == "ask" and event.data.get("answer"):
                    self._history.append((event.data["turn"]["question"], event.data["answer"]))
            request._push(event)
        self._worker_died(proc)

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self._stderr.append(line.rstrip())
            if self.on_stderr is not None:
                self.on_stderr(line.rstrip())

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
