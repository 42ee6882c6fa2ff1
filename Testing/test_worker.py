"""A real worker process on a tiny checkpoint: streaming, cancel, errors, crashes, cleanup."""

import gc
import os
import signal
import time

import numpy as np
import pydicom.data
import pytest

from RadFMSlicer.worker.client import WorkerClient, WorkerError

CT = pydicom.data.get_testdata_file("CT_small.dcm")


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    with WorkerClient.start() as c:
        c.load(tiny_checkpoint)
        yield c


def collect(request, timeout=120):
    tokens, final = [], None
    for event in request.events(timeout=timeout):
        if event.kind == "token":
            tokens.append(event.text)
        final = event
    return tokens, final


def test_streamed_tokens_concatenate_to_the_final_answer(client):
    tokens, final = collect(client.ask(question="Is there a pleural effusion", images=[CT], max_new_tokens=30))
    assert final.kind == "done", final.text
    assert len(tokens) > 3 and "".join(tokens) == final.data["answer"]
    turn = final.data["turn"]
    assert turn["question"] == "Is there a pleural effusion?"
    assert turn["images"][0]["shape"] == [3, 512, 512, 4] and os.path.isfile(turn["images"][0]["preview_png"])
    assert turn["provenance"]["model"]["dtype"] == "float32"


def test_attention_true_returns_a_map_file_on_the_scans_grid(client):
    """The panel's "Show where the model looked": the map comes back as a .npy named in the turn."""
    final = client.ask(question="Is there a nodule", images=[CT], max_new_tokens=2, attention=True).wait(120)
    assert final.kind == "done", final.text
    attention = final.data["turn"]["provenance"]["attention"]
    assert attention["label"] == "resampler attention, not an explanation"
    voxels = np.load(attention["file"])
    assert voxels.shape == (1, 128, 128)  # CT_small.dcm's own [k, j, i] grid: one 128 x 128 slice
    assert voxels.dtype == np.float32 and voxels.max() == 1.0 and voxels.min() >= 0
    plain = client.ask(question="Is there a nodule", images=[CT], max_new_tokens=2).wait(120)
    assert "attention" not in plain.data["turn"]["provenance"]  # not asked for: none computed


def test_cancel_mid_answer(client):
    request = client.ask(question="Describe the scan", images=[CT], max_new_tokens=1500)
    tokens = 0
    for event in request.events(timeout=120):
        if event.kind == "token":
            tokens += 1
            if tokens == 3:
                request.cancel()
    assert request.final.kind == "done" and request.final.data["stop_reason"] == "cancelled"
    assert len(request.final.data["turn"]["answer"]) > 0 and tokens < 200


def test_missing_file_is_named_and_worker_keeps_serving(client):
    final = client.ask(question="Is there", images=["/no/such/scan.nii.gz"]).wait(60)
    assert final.kind == "error" and "/no/such/scan.nii.gz" in final.text
    assert client.ask(question="Is there", images=[CT], max_new_tokens=2).wait(60).kind == "done"


def test_malformed_line_gets_an_error_and_worker_keeps_serving(client):
    client.proc.stdin.write(b"{not json\n")
    client.proc.stdin.flush()
    assert client.hello()["protocol"] == 1


def test_unknown_op_and_bad_settings_are_errors(client):
    assert "unknown op" in client.send("dance").wait(30).text
    final = client.ask(question="Is there", images=[CT], max_new_tokens=0).wait(30)
    assert final.kind == "error" and "max_new_tokens" in final.text


def test_status_reports_model_and_memory(client):
    status = client.status()
    assert status["loaded"] and status["memory"]["rss_mb"] > 0


def test_load_error_raises_with_the_workers_message(tiny_checkpoint):
    with WorkerClient.start() as c:
        with pytest.raises(WorkerError, match="checkpoint folder not found"):
            c.load("/no/such/checkpoint")


def test_kill_9_mid_answer_is_reported_and_next_ask_succeeds(tiny_checkpoint):
    with WorkerClient.start() as c:
        c.load(tiny_checkpoint)
        first_pid = c.pid
        request = c.ask(question="Describe", images=[CT], max_new_tokens=1900)
        for event in request.events(timeout=120):
            if event.kind == "token":
                os.kill(c.pid, signal.SIGKILL)
                killed = time.monotonic()
                break
        final = request.wait(timeout=30)
        assert final.kind == "error" and "SIGKILL" in final.text
        assert time.monotonic() - killed < 5
        final = c.ask(question="Is there", images=[CT], max_new_tokens=3).wait(120)
        assert final.kind == "done", final.text
        assert c.pid != first_pid and c.restarts == 1


def test_close_leaves_no_process_behind(tiny_checkpoint):
    c = WorkerClient.start()
    c.load(tiny_checkpoint)
    request = c.ask(question="Describe", images=[CT], max_new_tokens=1900)
    next(e for e in request.events(60) if e.kind == "token")
    pid = c.pid
    c.close()
    assert not process_exists(pid)


def test_a_client_removes_its_own_preview_folder_when_closed_or_dropped_and_keeps_one_it_was_given(
        tiny_checkpoint, tmp_path):
    """Each Slicer session, server start and CLI worker made a thumbnail folder in the temp folder and left it."""
    c = WorkerClient.start()
    c.load(tiny_checkpoint)
    final = c.ask(question="Describe", images=[CT], max_new_tokens=2).wait(120)
    preview = final.data["turn"]["images"][0]["preview_png"]
    assert os.path.isfile(preview)
    c.close()
    assert not os.path.exists(os.path.dirname(preview))
    dropped = WorkerClient()  # never closed
    folder = dropped.preview_dir
    del dropped
    gc.collect()
    assert not os.path.exists(folder)
    WorkerClient(preview_dir=str(tmp_path)).close()
    assert tmp_path.is_dir()


def test_worker_exits_when_its_client_disappears(tiny_checkpoint):
    """stdin closes when the parent dies: the worker must not linger as an orphan."""
    c = WorkerClient.start()
    c.hello()
    pid = c.pid
    c.proc.stdin.close()
    deadline = time.monotonic() + 10
    while process_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_exists(pid)
    c.close()


# =============================================================================== faults
# Each test injects a fault from the fault-injection run (issue 16, issue 11) and checks what
# a user would notice: an error event naming the cause, no request left without a final
# event, no process left behind, the worker still serving.
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

import psutil  # noqa: E402

from RadFMSlicer.worker.protocol import MAX_TEXT_CHARS  # noqa: E402
from RadFMSlicer.worker.server import WorkerServer  # noqa: E402

LAUNCHER = '''#!{python}
"""Like Slicer's PythonSlicer: runs the real Python as a child, exits 1 if the child dies from a signal."""
import os, subprocess, sys
os.write(2, b"launcher: \\xff\\xfe not UTF-8\\n")
os.write(2, b"launcher: starting the real python\\n")
child = subprocess.Popen([sys.executable, *sys.argv[1:]])
code = child.wait()
sys.exit(1 if code < 0 else code)
'''


@pytest.fixture
def launcher(tmp_path):
    path = tmp_path / "PythonSlicer"
    path.write_text(LAUNCHER.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def wait_gone(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while any(process_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if process_exists(p)]


class Recorder:
    """A sink that keeps (id, event) pairs."""

    def __init__(self):
        self.events = []

    def __call__(self, request_id, event):
        json.dumps(event.data)  # what the stdio sink would have to write
        self.events.append((request_id, event))

    def finals(self, request_id=None):
        return [e for rid, e in self.events if e.final and (request_id is None or rid == request_id)]


def served(lines: list[bytes], last_id) -> Recorder:
    """Serve ``lines`` from a pipe kept open until request ``last_id`` has its final event."""
    sink = Recorder()
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as stream, open(write_end, "wb", buffering=0) as feed:
        thread = threading.Thread(target=WorkerServer(sink, heartbeat_s=0).serve, args=(stream,))
        thread.start()
        threading.Thread(target=feed.write, args=(b"".join(lines),), daemon=True).start()
        deadline = time.monotonic() + 30
        while not sink.finals(last_id) and time.monotonic() < deadline:
            time.sleep(0.01)
    thread.join(10)
    return sink


MALFORMED = [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"id": "a", "op": ["ask"]}', b'{"id": "b", "op": {"x": 1}}', b'{"id": "c", "op": 7}',
    b'{"id": "d", "op": "cancel", "target": ["r1"]}', b'{"id": "e", "op": "cancel", "target": {"a": 1}}',
    *[b'{"id": %s, "op": "%s"}' % (bad, op) for bad in (b'["x"]', b'{"x": 1}', b"true")
      for op in (b"load", b"encode", b"ask", b"unload")],
    b'{"id": "f", "op": "ask", "question": "\xff\xfe caf\xe9"}',
    b"\xff\xfe\xfd", b"null", b"42", b'"ask"', b"{}",
]


def test_malformed_requests_get_errors_and_the_work_thread_keeps_serving():
    """Each of these killed the worker or its work thread (then every later load hung)."""
    sink = served([line + b"\n" for line in MALFORMED] + [b'{"id": "last", "op": "load"}\n'], "last")
    errors = [e for rid, e in sink.events if e.kind == "error" and rid not in ("f", "last")]
    assert len(errors) == len(MALFORMED) - 1
    assert "no image given" in sink.finals("f")[0].text  # invalid UTF-8 in a question: decoded leniently, checked
    assert all(e.text.startswith("malformed request") for e in errors), [e.text for e in errors]
    assert "nested too deeply" in errors[0].text and "'op'" in errors[1].text
    assert "'target'" in errors[4].text and "'id'" in errors[6].text
    (last,) = sink.finals("last")
    assert last.kind == "error" and "checkpoint" in last.text  # answered by a living work thread


def test_a_worker_under_a_strict_locale_survives_invalid_utf8_on_stdin():
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "ascii:strict"}
    with WorkerClient.start(env=env, hang_timeout=30) as c:
        c.proc.stdin.write(b'\xff\xfe{"op": "hello"\xff}\n' + b"[" * 100_000 + b"\n")
        c.proc.stdin.flush()
        assert c.hello()["protocol"] == 1
        with pytest.raises(WorkerError, match="checkpoint folder not found"):
            c.load("/no/such/checkpoint", timeout=60)


BAD_FIELDS = [
    ("ask", {"question": 5}, "'question' must be text"),
    ("ask", {"history": ["a"]}, "'history' must be text"),
    ("ask", {"seed": "1"}, "'seed' must be an integer"),
    ("ask", {"temperature": math.nan}, "'temperature' must be a finite number"),
    ("ask", {"repetition_penalty": math.nan}, "'repetition_penalty' must be a finite number > 0"),
    ("ask", {"top_p": 0}, "'top_p' must be a finite number > 0 and <= 1"),
    ("ask", {"top_k": 1.5}, "'top_k' must be an integer"),
    ("ask", {"max_new_tokens": True}, "'max_new_tokens' must be an integer"),
    ("ask", {"images": "scan.nii"}, "'images' must be a list"),
    ("ask", {"previous_turns": [["only a question"]]}, "'previous_turns[0]' must be a [question, answer] pair"),
    ("ask", {"question": "x" * (MAX_TEXT_CHARS + 1)}, f"at most {MAX_TEXT_CHARS:,}"),
    ("ask", {"attention": "yes"}, "'attention' must be true or false"),
    ("ask", {"attention": True}, "'attention' needs 'preview_dir'"),
    ("encode", {"window": 40}, "'window' must be a preset name"),
    ("load", {"checkpoint": 5}, "'checkpoint' must be text"),
    ("load", {"checkpoint": "/x", "compile_decode": "yes"}, "'compile_decode' must be true or false"),
]


@pytest.mark.parametrize("op,fields,message", BAD_FIELDS)
def test_a_wrongly_typed_field_is_named(op, fields, message):
    """These came back as 'internal error: TypeError' (NaN penalty was accepted: an empty answer)."""
    sink = Recorder()
    WorkerServer(sink, heartbeat_s=0).handle({"id": "r", "op": op, **fields})
    (final,) = sink.finals("r")
    assert final.kind == "error" and message in final.text and final.data["kind"] == "protocol"


def test_a_50_mb_question_is_refused_at_once():
    sink = Recorder()
    start = time.perf_counter()
    WorkerServer(sink, heartbeat_s=0).handle({"id": "r", "op": "ask", "question": "x" * 50_000_000})
    assert time.perf_counter() - start < 1.0
    assert "at most" in sink.finals("r")[0].text


def test_cancel_bookkeeping_forgets_misses_and_refuses_duplicate_live_ids():
    sink = Recorder()
    server = WorkerServer(sink, heartbeat_s=0)  # work thread not started: requests stay queued
    server.handle({"id": "c1", "op": "cancel", "target": "later"})
    assert sink.finals("c1")[0].data["matched"] is False
    server.handle({"id": "later", "op": "load"})  # reuses the id that was cancelled before it existed
    server.handle({"id": "later", "op": "unload"})
    assert "already in use" in sink.finals("later")[0].text
    for n in range(1000):
        server.handle({"id": f"c{n}", "op": "cancel", "target": f"gone{n}"})
    assert not server._cancelled  # nothing remembered for ids that matched nothing
    server.start()
    server.close()
    final = sink.finals("later")[-1]
    assert final.kind == "error" and "checkpoint" in final.text  # it ran: it was not cancelled at once


def test_shutdown_with_queued_work_gives_each_a_final_event_and_exits_cleanly(tiny_checkpoint):
    c = WorkerClient.start(hang_timeout=60)
    c.load(tiny_checkpoint)
    running = c.ask(question="Describe", images=[CT], max_new_tokens=1900)
    queued = [c.ask(question="Is there", images=[CT], max_new_tokens=1900) for _ in range(3)]
    next(e for e in running.events(60) if e.kind == "token")
    popen = c.proc
    c.send("shutdown").wait(30)
    start = time.monotonic()
    for request in [running, *queued]:
        final = request.wait(30)
        assert final.kind == "done" and final.data["stop_reason"] == "cancelled", final.text
    assert popen.wait(timeout=15) == 0 and time.monotonic() - start < 10
    c.close()


def test_a_failed_load_keeps_the_model_already_loaded(client):
    with pytest.raises(WorkerError, match="still loaded"):
        client.load("/no/such/checkpoint")
    assert client.ask(question="Is there", images=[CT], max_new_tokens=2).wait(60).kind == "done"


def test_a_stopped_worker_is_reported_ended_and_restarted():
    """SIGSTOP (as a stuck CUDA call): poll() never reported anything and alive() stayed true."""
    with WorkerClient.start(hang_timeout=2) as c:
        c.hello()
        pid = c.pid
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        request = c.send("status")
        big = "x" * 2_000_000
        for _ in range(4):  # far more than a pipe holds: the caller must not block
            t0 = time.monotonic()
            c.send("ask", question=big)
            assert time.monotonic() - t0 < 0.5
        final = request.wait(30)
        assert final.kind == "error" and "stopped responding" in final.text, final.text
        assert time.monotonic() - stopped < 8 and not c.alive()
        assert wait_gone([pid]) == []
        assert c.hello()["pid"] != pid and c.restarts == 1


def worker_processes(besides=()):
    """Worker processes started by this test process, other than ``besides`` (a module fixture's)."""
    return [p for p in psutil.Process().children(recursive=True)
            if "RadFMSlicer.worker" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE
            and p.pid not in besides]


def test_threads_asking_after_a_crash_share_one_restart_and_close_ends_all():
    others = {p.pid for p in worker_processes()}
    c = WorkerClient.start(hang_timeout=30)
    c.hello()
    os.kill(c.pid, signal.SIGKILL)
    while c.alive():
        time.sleep(0.01)
    results = []
    threads = [threading.Thread(target=lambda: results.append(c.hello(timeout=60))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len({r["pid"] for r in results}) == 1  # all answered by one fresh worker
    assert c.restarts == 1 and len(worker_processes(others)) == 1
    c.close()
    assert wait_gone([p.pid for p in worker_processes(others)]) == []


ORPHAN_PARENT = """
import os, sys, time
from RadFMSlicer.worker.client import WorkerClient
c = WorkerClient.start(hang_timeout=30)
print(c.hello()["pid"], flush=True)
if os.fork() == 0:  # a forked child inherits the worker's pipes and keeps them open
    time.sleep(30)
    os._exit(0)
os._exit(0)  # the parent dies without closing anything
"""


def test_the_worker_exits_when_its_parent_dies_even_if_a_fork_holds_its_pipe():
    parent = subprocess.run([sys.executable, "-c", ORPHAN_PARENT], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
    worker_pid = int(parent.stdout.split()[0])
    assert wait_gone([worker_pid], timeout=5) == []


def test_kill_9_below_a_launcher_is_named_and_leaves_no_process(launcher, tiny_checkpoint):
    lines = []
    c = WorkerClient.start(python=launcher, hang_timeout=30, on_stderr=lines.append)
    c.hello()
    launcher_pid, worker_pid = c.proc.pid, c.pid
    assert launcher_pid != worker_pid and psutil.Process(worker_pid).ppid() == launcher_pid
    request = c.send("load", checkpoint=str(tiny_checkpoint))
    os.kill(worker_pid, signal.SIGKILL)
    final = request.wait(30)
    assert final.kind == "error" and "killed by a signal" in final.text and "launcher" in final.text, final.text
    assert wait_gone([launcher_pid, worker_pid]) == []
    assert "launcher: \ufffd\ufffd not UTF-8" in lines and "launcher: starting the real python" in lines
    assert c.hello()["pid"] != worker_pid  # restarted below a fresh launcher
    c.close()


def test_close_and_hang_end_the_whole_tree_below_a_launcher(launcher):
    c = WorkerClient.start(python=launcher, hang_timeout=2)
    c.hello()
    tree = [c.proc.pid, c.pid]
    os.kill(c.pid, signal.SIGSTOP)
    assert "stopped responding" in c.send("status").wait(30).text
    assert wait_gone(tree) == []
    c.hello()
    tree = [c.proc.pid, c.pid]
    c.close()
    assert wait_gone(tree) == []


def test_on_windows_the_worker_starts_without_a_console_window(monkeypatch):
    from RadFMSlicer.worker import client as client_module

    class StartupInfo:
        dwFlags = 0
        wShowWindow = None

    monkeypatch.setattr(client_module.os, "name", "nt")
    monkeypatch.setattr(subprocess, "STARTUPINFO", StartupInfo, raising=False)
    for name, value in (("STARTF_USESHOWWINDOW", 1), ("SW_HIDE", 0), ("CREATE_NO_WINDOW", 0x08000000)):
        monkeypatch.setattr(subprocess, name, value, raising=False)
    options = client_module._popen_options()
    assert options["creationflags"] == 0x08000000
    assert options["startupinfo"].dwFlags & 1 and options["startupinfo"].wShowWindow == 0


def test_an_overlong_line_is_refused_and_the_next_one_served():
    from RadFMSlicer.worker.protocol import MAX_LINE_BYTES

    line = b'{"id": "big", "op": "ask", "question": "' + b"x" * MAX_LINE_BYTES + b'"}\n'
    sink = served([line, b'{"id": "last", "op": "load"}\n'], "last")
    assert any("longer than" in e.text for rid, e in sink.events if rid is None)
    assert not sink.finals("big") and "checkpoint" in sink.finals("last")[0].text


def test_a_failing_log_callback_does_not_stop_the_stderr_reader(launcher):
    def broken(line):
        raise RuntimeError("log pane gone")

    with WorkerClient.start(python=launcher, hang_timeout=30, on_stderr=broken) as c:
        assert c.hello()["protocol"] == 1
        deadline = time.monotonic() + 10
        while "launcher: starting the real python" not in c.stderr_tail() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "launcher: starting the real python" in c.stderr_tail()
        assert any("log callback failed: RuntimeError: log pane gone" in line for line in c.stderr_tail())


def test_attention_costs_no_second_encode(tiny_checkpoint, tmp_path):
    """The map comes from the encoding the answer then reuses: one vision pass per ask."""
    from RadFMSlicer.engine import RadFMEngine

    server = WorkerServer(Recorder(), heartbeat_s=0)
    server.engine = RadFMEngine.load(tiny_checkpoint)
    passes = []
    encode = server.engine.model.encode_images
    server.engine.model.encode_images = lambda *a, **k: (passes.append(k), encode(*a, **k))[1]
    server.op_ask("a", {"id": "a", "op": "ask", "question": "Is there a nodule", "images": [CT],
                        "max_new_tokens": 2, "preview_dir": str(tmp_path), "attention": True})
    (final,) = server.sink.finals("a")
    assert final.kind == "done" and os.path.isfile(final.data["turn"]["provenance"]["attention"]["file"])
    assert passes == [{"return_attention": True}]


def test_a_queued_ask_reads_its_region_mask_once(tiny_checkpoint, tmp_path, monkeypatch):
    """The request is parsed when it arrives (to refuse a bad one at once) and the answer uses that parse."""
    from RadFMSlicer import ask as ask_module
    from RadFMSlicer.engine import RadFMEngine

    volume = pydicom.dcmread(CT).pixel_array[None].astype(np.int16)
    mask = np.zeros_like(volume, dtype=np.uint8)
    mask[0, 40:80, 40:80] = 1
    np.save(tmp_path / "mask.npy", mask)
    reads = []
    load_npy = ask_module._load_npy
    monkeypatch.setattr(ask_module, "_load_npy", lambda path, *a, **k: (reads.append(path), load_npy(path, *a, **k))[1])
    server = WorkerServer(Recorder(), heartbeat_s=0)
    server.engine = RadFMEngine.load(tiny_checkpoint)
    server.start()
    for op in ("encode", "ask"):
        server.handle({"id": op, "op": op, "question": "Is it round?", "images": [CT], "max_new_tokens": 2,
                       "regions": [{"mask": str(tmp_path / "mask.npy"), "image": 0}]})
    deadline = time.monotonic() + 60
    while len(server.sink.finals()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.close()
    assert [final.kind for final in server.sink.finals()] == ["done", "done"], server.sink.finals()
    assert reads == [str(tmp_path / "mask.npy")] * 2  # one read per request, not one more on the work thread
