"""A real worker process on a tiny checkpoint: streaming, cancel, errors, crashes, cleanup."""

import os
import signal
import time

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
    client.proc.stdin.write("{not json\n")
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
