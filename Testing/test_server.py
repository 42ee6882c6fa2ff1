"""radfm serve and RemoteClient on 127.0.0.1: same answers as here, safe refusals, nothing private sent."""

import contextlib
import http.client
import io
import json
import os
import signal
import socket
import threading
import time
import zipfile
from types import SimpleNamespace

import numpy as np
import pydicom
import pydicom.data
import pytest

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402

from RadFMSlicer.ask import AskRequest, ImageInput, ask  # noqa: E402
from RadFMSlicer.cli import main as radfm  # noqa: E402
from RadFMSlicer.generation import GenerationSettings  # noqa: E402
from RadFMSlicer.remote import RemoteClient, image_id, upload_body  # noqa: E402
from RadFMSlicer.testing import free_port, serving  # noqa: E402
from RadFMSlicer.worker import WorkerError  # noqa: E402
from RadFMSlicer.worker.http import Ask, FairQueue, HTTPError, ServeConfig, create_app  # noqa: E402
from RadFMSlicer.worker.client import previous_turns_param  # noqa: E402

TOKEN = "reading-room-token-0123456789"
CT = pydicom.data.get_testdata_file("CT_small.dcm")


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    port = free_port()
    cache = tmp_path_factory.mktemp("serve") / "uploads"
    config = ServeConfig(checkpoint=str(tiny_checkpoint), port=port, token=TOKEN, cache_dir=str(cache),
                         cache_mb=24, max_upload_mb=8, queue_limit=3)
    app = create_app(config)
    with serving(app, port):
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, app=app, cache=cache)


def call(server, method, path, body=None, token=TOKEN, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    connection.request(method, "/v1" + path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def worker_pid(server) -> int:
    return json.loads(call(server, "GET", "/model")[1])["pid"]


def test_health_is_open_everything_else_needs_the_token(server):
    status, body = call(server, "GET", "/health", token=None)
    assert status == 200 and json.loads(body) == {"status": "ok", "tls": False, "token_required": True}
    for token in (None, "wrong-token", TOKEN + "x"):
        assert call(server, "GET", "/model", token=token) == (401, b'{"detail":"unauthorized"}')
        assert call(server, "POST", "/ask", b"{}", token=token)[0] == 401
    info = json.loads(call(server, "GET", "/model")[1])
    assert info["loaded"] and len(info["model"]["checkpoint_fingerprint"]) == 16
    assert info["model"]["dtype"] == "float32" and info["model"]["device"] == "cpu"
    assert "checkpoint" not in info["model"] and info["memory"]["free_ram_mb"] > 0


def test_remote_answer_is_the_local_answer(server, tiny_engine):
    settings = GenerationSettings(max_new_tokens=12)
    local = ask(tiny_engine, AskRequest(task="vqa", question="Is there an effusion?", images=[ImageInput(path=CT)],
                                        settings=settings))
    client = RemoteClient(server.url, TOKEN)
    assert client.load()["model"]["checkpoint_fingerprint"] == local.provenance["model"]["checkpoint_fingerprint"]
    request = client.ask("Is there an effusion?", images=[CT], max_new_tokens=12)
    events = list(request.events(60))
    assert [e.kind for e in events][-1] == "done", events[-1]
    tokens = "".join(e.text for e in events if e.kind == "token")
    assert tokens == local.answer == request.final.data["answer"]
    turn = request.final.data["turn"]
    assert turn["images"][0]["label"] == "CT_small.dcm" and turn["images"][0]["window"] == local.images[0].window


def test_wrong_token_and_gone_server_are_worker_errors(server):
    with pytest.raises(WorkerError, match="refused the token"):
        RemoteClient(server.url, "not-the-token-at-all-000").load()
    final = RemoteClient(server.url, "not-the-token-at-all-000").ask("q", images=[CT]).wait(30)
    assert final.kind == "error" and "refused the token" in final.text
    with pytest.raises(WorkerError, match="cannot reach the RadFM server"):
        RemoteClient(f"http://127.0.0.1:{free_port()}").load()


def bad_upload(voxels, matrix=np.eye(4)) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, voxels=voxels, ijk_to_ras=matrix)
    return buffer.getvalue()


def test_readers_uploading_the_same_scan_at_once_all_get_it(tmp_path):
    """Readers who open one study send the same scan together: each upload gets its id and the scan, never a
    half-written file (the real vLLM lane met a 500 from reading the other upload's geometry mid-write)."""
    from RadFMSlicer.worker.http import ImageStore

    voxels = np.arange(40 * 64 * 64, dtype=np.int16).reshape(40, 64, 64)
    body = upload_body(voxels, np.diag([0.7, 0.7, 2.5, 1.0]))
    for attempt in range(10):
        store = ImageStore(str(tmp_path / f"cache{attempt}"), limit_bytes=1 << 30, max_upload_bytes=1 << 30)
        start, ids, failures = threading.Barrier(6), [], []

        def upload():
            start.wait()
            try:
                ids.append(store.put(body))
                assert store.geometry(ids[-1]) is not None
            except Exception as exc:  # noqa: BLE001 - any failure is what the test is about
                failures.append(repr(exc))

        threads = [threading.Thread(target=upload) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == [] and len(set(ids)) == 1
        assert np.array_equal(np.load(store.voxels_path(ids[0])), voxels)
        assert store.geometry(ids[0]) == {"ijk_to_ras": np.diag([0.7, 0.7, 2.5, 1.0]).tolist()}
        assert sorted(p.name for p in store.folder.iterdir()) == [f"{ids[0]}.json", f"{ids[0]}.npy"]  # no leftovers


def test_an_upload_the_servers_full_disk_cannot_keep_is_a_507_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from RadFMSlicer import storage
    from RadFMSlicer.worker.http import ImageStore

    store = ImageStore(str(tmp_path / "cache"), limit_bytes=1 << 30, max_upload_bytes=1 << 30)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.os, "fsync", disk_full)
    with pytest.raises(HTTPError) as refused:
        store.put(upload_body(np.zeros((4, 8, 8), np.int16), np.eye(4)))
    assert refused.value.status == 507 and "No space left on device" in refused.value.detail
    assert list(store.folder.iterdir()) == []


def test_a_scan_evicted_while_it_is_looked_up_is_simply_not_there(tmp_path):
    """The upload cache evicts the least recently used scan while another reader asks whether it is there: the
    answer is "not here" (it is sent again), never an error."""
    from RadFMSlicer.worker.http import ImageStore

    bodies = [upload_body(np.full((8, 32, 32), n, np.int16), np.eye(4)) for n in range(6)]
    store = ImageStore(str(tmp_path / "cache"), limit_bytes=3 * 8 * 32 * 32 * 2, max_upload_bytes=1 << 30)
    ids, failures, stop = [store.put(b) for b in bodies], [], threading.Event()

    def look():
        while not stop.is_set():
            for upload_id in ids:
                try:
                    store.geometry(upload_id)
                except Exception as exc:  # noqa: BLE001
                    failures.append(repr(exc))

    lookers = [threading.Thread(target=look) for _ in range(3)]
    for thread in lookers:
        thread.start()
    for _ in range(60):
        for body in bodies:
            store.put(body)
    stop.set()
    for thread in lookers:
        thread.join()
    assert failures == []


def test_bad_uploads_and_asks_get_one_line_refusals(server):
    good = upload_body(np.arange(64, dtype=np.int16).reshape(4, 4, 4), np.eye(4))
    status, body = call(server, "POST", "/images", good)
    assert status == 200 and json.loads(body)["id"] == image_id(np.arange(64, dtype=np.int16).reshape(4, 4, 4), np.eye(4))
    assert oct((server.cache).stat().st_mode & 0o777) == "0o700"
    cases = [
        (good[: len(good) // 2], 400, "not a complete .npz"),
        (bad_upload(np.zeros((4, 4, 4), complex)), 400, "voxels of type complex128 are not an image"),
        (bad_upload(np.zeros(4, np.int16)), 400, "2D or 3D"),
        (bad_upload(np.zeros((4, 4)), np.eye(3)), 400, "finite 4x4"),
        (bad_upload(np.zeros((256, 128, 128), np.float32)), 413, "more than 8 MB"),
        (b"\0" * (9 << 20), 413, "larger than 8 MB"),
    ]
    for body, status, message in cases:
        got_status, got = call(server, "POST", "/images", body)
        assert (got_status, message in json.loads(got)["detail"]) == (status, True), (status, got)
    unknown_id = "0" * 64
    uploaded = json.loads(call(server, "POST", "/images", good)[1])["id"]
    asks = [
        (b"{not json", 400, "malformed JSON"),
        (json.dumps({"question": "q", "images": [{"id": unknown_id}]}).encode(), 404, "unknown image id"),
        (json.dumps({"question": "q", "images": [{"path": "/etc/passwd"}]}).encode(), 400, "never reads a path"),
        (json.dumps({"question": "q", "images": []}).encode(), 400, "no image given"),
        (json.dumps({"images": [{"id": json.loads(call(server, "POST", "/images", good)[1])["id"]}],
                     "settings": {"max_new_tokens": 0}}).encode(), 400, "max_new_tokens must be a positive integer"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
        (json.dumps({"images": [{"id": uploaded}], "question": "Is there \ud800 fluid?"}).encode(), 400,
         "the question holds a lone surrogate U+D800"),
        (json.dumps({"images": [{"id": uploaded}], "question": "Compare <image> to </image>"}).encode(), 400,
         "the question contains '<image>', one of the model's own image tags"),
        (json.dumps({"images": [{"id": uploaded}], "question": "Any fluid?", "history": "cough\u0000"}).encode(), 400,
         "the clinical history holds the control character U+0000"),
        (json.dumps({"images": [{"id": uploaded}], "previous_turns": [["What is <image3>?", "x"]]}).encode(), 400,
         "'previous_turns' question 1 contains '<image3>'"),
        (json.dumps({"images": [{"id": uploaded}], "question": 5}).encode(), 400, "question takes text, got int"),
        (json.dumps({"images": [{"id": uploaded, "role": "future"}]}).encode(), 400,
         "an image's role takes 'current' or 'prior', got 'future'"),
        (json.dumps({"images": [{"id": uploaded}], "window": "liver"}).encode(), 400, "Unknown window 'liver'"),
        (json.dumps({"images": [{"id": uploaded}], "regions": [{"box_ras": [[0, 0], [1, 1, 1]]}]}).encode(), 400,
         "must be 3 numbers"),
    ]
    for body, status, message in asks:
        got_status, got = call(server, "POST", "/ask", body, headers={"Content-Type": "application/json"})
        assert (got_status, message in json.loads(got)["detail"]) == (status, True), (status, got)
    assert call(server, "GET", "/health", token=None)[0] == 200  # still serving


def open_stream(server, body: dict):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/ask", json.dumps(body),
                       {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    return connection, connection.getresponse()


def read_until(response, kind: str) -> list[dict]:
    seen, event = [], None
    for raw in response:
        line = raw.decode().strip()
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            seen.append({"event": event, **json.loads(line[5:])})
            if event in (kind, "done", "error"):
                return seen
    return seen


def uploaded_ct(server) -> str:
    client = RemoteClient(server.url, TOKEN)
    return client.encode([CT]).result(60)["images"][0]


def wait_idle(server, seconds=20.0) -> None:
    deadline = time.monotonic() + seconds
    while json.loads(call(server, "GET", "/model")[1])["busy"]:
        assert time.monotonic() < deadline, "the worker is still generating"
        time.sleep(0.05)


def test_closing_the_stream_cancels_the_answer(server):
    image = uploaded_ct(server)
    connection, response = open_stream(server, {"question": "q", "images": [{"id": image}],
                                                "settings": {"max_new_tokens": 1500}})
    assert read_until(response, "token")[-1]["event"] == "token"
    started = time.monotonic()
    connection.close()
    wait_idle(server)
    assert time.monotonic() - started < 5
    # the next reader is served at once
    done = RemoteClient(server.url, TOKEN).ask("next", images=[CT], max_new_tokens=4).wait(60)
    assert done.kind == "done"


def test_worker_killed_mid_answer_is_a_503_and_the_server_goes_on(server):
    image = uploaded_ct(server)
    connection, response = open_stream(server, {"question": "q", "images": [{"id": image}],
                                                "settings": {"max_new_tokens": 1500}})
    read_until(response, "token")
    os.kill(worker_pid(server), signal.SIGKILL)
    final = read_until(response, "error")[-1]
    assert final["event"] == "error" and final["data"]["http_status"] == 503
    assert "killed by SIGKILL" in final["text"]
    connection.close()
    done = RemoteClient(server.url, TOKEN).ask("again", images=[CT], max_new_tokens=4).wait(120)
    assert done.kind == "done", done.text


def test_a_full_queue_answers_busy_with_the_count_ahead(server):
    image = uploaded_ct(server)
    body = {"question": "q", "images": [{"id": image}], "settings": {"max_new_tokens": 1500}}
    streams = [open_stream(server, body) for _ in range(4)]  # one running + queue_limit 3 waiting
    for _, response in streams:
        read_until(response, "status")
    status, detail = call(server, "POST", "/ask", json.dumps(body).encode())
    assert status == 429 and json.loads(detail)["detail"].startswith("busy, 3 ahead")
    for connection, _ in streams:
        connection.close()
    wait_idle(server)


def test_only_the_configured_address_listens(server):
    import psutil

    listening = [c.laddr for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert [a for a in listening if a.port == server.port] == [("127.0.0.1", server.port)]
    assert all(a.ip in ("127.0.0.1", "::1") for a in listening)


def server_log(server) -> str:
    return "\n".join(server.app.state.worker.stderr_tail())


def test_the_client_sends_no_patient_identifier(server, tmp_path, caplog):
    """Every byte the client sends passes a recording proxy; the DICOM's name, id and file name are in none."""
    scan = pydicom.dcmread(CT)
    scan.PatientName, scan.PatientID = "Quxworth^Zelda", "PID-558812"
    pixels = scan.pixel_array.copy()
    pixels[0, 0] += 1  # a scan the server has not seen, so that it is uploaded
    scan.PixelData = pixels.tobytes()
    path = tmp_path / "Quxworth_Zelda_CT.dcm"
    scan.save_as(path)
    secrets = [b"Quxworth", b"Zelda", b"PID-558812", b"Quxworth_Zelda"]

    sent = bytearray()
    listener = socket.create_server(("127.0.0.1", 0))

    def relay(source, target, record):
        with contextlib.suppress(OSError):  # either side closing ends the relay
            while data := source.recv(65536):
                if record:
                    sent.extend(data)
                target.sendall(data)
        target.close()

    def accept():
        while True:
            try:
                downstream, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", server.port))
            threading.Thread(target=relay, args=(downstream, upstream, True), daemon=True).start()
            threading.Thread(target=relay, args=(upstream, downstream, False), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    logs = caplog
    caplog.set_level("DEBUG")
    client = RemoteClient(f"http://127.0.0.1:{listener.getsockname()[1]}", TOKEN)
    request = client.ask("Any finding?", images=[str(path)], regions=[{"name": "Zelda's lesion",
                                                                        "box_ijk": [[40, 40, 0], [80, 80, 0]]}],
                         max_new_tokens=4)
    final = request.wait(60)
    assert final.kind == "done", final.text
    assert final.data["turn"]["images"][0]["label"] == path.name  # provenance completed on the client
    assert final.data["turn"]["images"][1]["label"] == "Zelda's lesion"
    assert sent.count(b"POST /v1/images") == 1
    first = bytes(sent)
    again = client.ask("Any finding?", images=[str(path)], max_new_tokens=2).wait(60)
    assert again.kind == "done" and bytes(sent[len(first):]).count(b"POST /v1/images") == 0  # already there
    listener.close()
    sent[:] = first
    payloads = [sent]
    start = sent.find(b"PK\x03\x04")
    archive = zipfile.ZipFile(io.BytesIO(bytes(sent[start:sent.find(b"POST /v1/ask")])))
    assert sorted(archive.namelist()) == ["ijk_to_ras.npy", "voxels.npy"]
    payloads += [archive.read(name) for name in archive.namelist()]
    for secret in secrets + [b"Zelda's lesion", b"Any finding?"]:
        assert not any(secret in payload for payload in payloads[1:]), secret
        if secret != b"Any finding?":  # the prompt is sent, nothing else
            assert secret not in sent, secret
        assert secret.decode() not in logs.text and secret.decode() not in server_log(server), secret


def test_a_question_after_its_encode_reads_and_hashes_the_scan_once(server, tmp_path, monkeypatch):
    """Preparing ahead and then asking (and each follow-up) about an unchanged scan: one read and hash, not one each;
    the server is still asked whether it has the upload every time."""
    from RadFMSlicer import remote

    volume = pydicom.dcmread(CT).pixel_array[None].astype(np.int16)
    np.save(tmp_path / "volume.npy", volume)
    image = {"array": str(tmp_path / "volume.npy"), "ijk_to_ras": np.diag([0.66, 0.66, 5.0, 1]).tolist(),
             "name": "Chest CT", "role": "current"}
    hashed, asked = [], []
    image_id_, call_ = remote.image_id, RemoteClient._call
    monkeypatch.setattr(remote, "image_id", lambda *a: (hashed.append(1), image_id_(*a))[1])
    monkeypatch.setattr(RemoteClient, "_call", lambda self, method, path, *a, **k: (
        asked.append(path) if path.startswith("/images/") else None, call_(self, method, path, *a, **k))[1])
    client = RemoteClient(server.url, TOKEN)
    assert client.encode([image]).wait(30).kind == "done"
    for question in ("Is it round?", "Is it new?"):
        final = client.ask(question, images=[dict(image)], max_new_tokens=2).wait(60)
        assert final.kind == "done", final.text
        assert final.data["turn"]["images"][0]["label"] == "Chest CT"
    assert len(hashed) == 1
    assert len(asked) == 3
    np.save(tmp_path / "volume.npy", volume + 1)  # a changed scan is read again
    assert client.encode([image]).wait(30).kind == "done" and len(hashed) == 2


def test_a_long_lived_client_keeps_only_the_turns_it_would_send():
    """The client ``radfm serve`` shares between readers answers for all of them: it keeps the last three, not all."""
    client = RemoteClient(f"http://127.0.0.1:{free_port()}")
    for k in range(50):
        client._complete_provenance({"answer": f"A{k}", "turn": {"question": f"Q{k}?"}}, [])
    assert len(client._history) == 3
    assert previous_turns_param(True, None, client._history) == [["Q47?", "A47"], ["Q48?", "A48"], ["Q49?", "A49"]]
    assert previous_turns_param(True, [("mine?", "yes")], client._history) == [["mine?", "yes"]]
    assert previous_turns_param(False, None, client._history) is None


def test_fair_queue_takes_clients_in_turn():
    import asyncio

    async def order():
        queue = FairQueue(limit=10)
        asks = [Ask(f"{c}{n}", c, {}, []) for c, n in [("A", 1), ("A", 2), ("A", 3), ("B", 1), ("C", 1)]]
        ahead = [queue.add(a) for a in asks]
        return ahead, [(await queue.next()).id for _ in asks]

    ahead, taken = asyncio.run(order())
    assert taken == ["A1", "B1", "C1", "A2", "A3"]
    assert ahead == [0, 1, 2, 1, 2]
    full = FairQueue(limit=1)
    full.add(Ask("x", "A", {}, []))
    with pytest.raises(HTTPError, match="busy, 1 ahead"):
        full.add(Ask("y", "B", {}, []))


def test_serve_refuses_unsafe_settings_in_one_line(fixture_dir, tmp_path, capsys):
    assert radfm(["serve", "--checkpoint", str(fixture_dir), "--host", "0.0.0.0"]) == 2
    assert "--token-file" in capsys.readouterr().err
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o644)
    assert radfm(["serve", "--checkpoint", str(fixture_dir), "--host", "0.0.0.0", "--token-file", str(token)]) == 2
    assert f"chmod 600 {token}" in capsys.readouterr().err
    token.chmod(0o600)
    token.write_text("short")
    assert radfm(["serve", "--checkpoint", str(fixture_dir), "--host", "0.0.0.0", "--token-file", str(token)]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert radfm(["serve", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- panel: "Run on: server"
class MemoryStore(dict):
    """A QSettings stand-in: what the panel would write to Slicer's settings file."""

    def value(self, key):
        return self.get(key)

    def setValue(self, key, value):
        self[key] = value

    def sync(self):
        pass


@pytest.fixture
def panel_lib(monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "RadFMModule"))
    from RadFMModuleLib import assistant, settings

    monkeypatch.setattr(settings, "_session_tokens", {})
    return SimpleNamespace(assistant=assistant, settings=settings, sys=sys)


class MemoryKeyring:
    """A keyring backend in memory (keyring.backend.KeyringBackend), as the OS keychain would be."""

    priority = 1

    def __init__(self):
        self.saved = {}

    def set_password(self, service, user, password):
        self.saved[(service, user)] = password

    def get_password(self, service, user):
        return self.saved.get((service, user))


def test_the_server_token_is_kept_in_the_keyring_never_in_settings(panel_lib, monkeypatch):
    import keyring

    settings = panel_lib.settings
    backend = MemoryKeyring()
    monkeypatch.setattr(keyring, "set_password", backend.set_password)
    monkeypatch.setattr(keyring, "get_password", backend.get_password)
    store = MemoryStore()
    settings.ModelSettings(run_on=settings.RUN_SERVER, server_url="https://rad:8765").save(store)
    assert settings.save_token("https://rad:8765", TOKEN) is True
    assert TOKEN not in json.dumps(store) and store["RadFM/run_on"] == "server"
    assert settings.ModelSettings.load(store).server_url == "https://rad:8765"
    monkeypatch.setattr(settings, "_session_tokens", {})  # Slicer restarted: the keyring still has it
    assert settings.load_token("https://rad:8765") == TOKEN

    def no_keyring(*args):
        raise RuntimeError("No recommended backend was available")

    monkeypatch.setattr(keyring, "set_password", no_keyring)
    monkeypatch.setattr(keyring, "get_password", no_keyring)
    assert settings.save_token("https://other:8765", TOKEN) is False  # kept for this session only
    assert settings.load_token("https://other:8765") == TOKEN


def test_the_panel_asks_the_server_with_its_own_inputs(panel_lib, server, tmp_path):
    """What the panel builds (Slicer arrays as .npy, a segment mask) answered by the server."""
    settings = panel_lib.settings
    settings.save_token(server.url, TOKEN)
    helper = panel_lib.assistant.Assistant(scene=None, settings=settings.ModelSettings(
        run_on=settings.RUN_SERVER, server_url=server.url))
    client = helper.connect()
    assert isinstance(client, RemoteClient) and client.alive()
    volume = pydicom.dcmread(CT).pixel_array[None].astype(np.int16)
    np.save(tmp_path / "volume.npy", volume)
    mask = np.zeros_like(volume, dtype=np.uint8)
    mask[0, 40:80, 40:80] = 1
    np.save(tmp_path / "mask.npy", mask)
    image = {"array": str(tmp_path / "volume.npy"), "ijk_to_ras": np.diag([0.66, 0.66, 5.0, 1]).tolist(),
             "name": "Chest CT (Doe)", "window": "40.0,400.0", "role": "current"}
    region = {"mask": str(tmp_path / "mask.npy"), "label": None, "name": "Segment_1", "image": 0}
    final = client.ask(task="vqa", question="Is it round?", images=[image], regions=[region],
                       max_new_tokens=4).wait(60)
    assert final.kind == "done", final.text
    labels = [r["label"] for r in final.data["turn"]["images"]]
    assert labels == ["Chest CT (Doe)", "Segment_1"]
    assert final.data["turn"]["images"][0]["window"]["center"] == 40.0
    helper.settings = settings.ModelSettings(run_on=settings.RUN_SERVER)
    with pytest.raises(ValueError, match="server's address"):
        helper.build_ask("vqa", "q", panel_lib.assistant.Selection(volume_id="v"))


def test_a_scan_chosen_with_a_server_is_uploaded_ahead_and_not_again_with_the_question(panel_lib, server,
                                                                                      monkeypatch):
    settings, assistant_module = panel_lib.settings, panel_lib.assistant
    settings.save_token(server.url, TOKEN)
    pixels = pydicom.dcmread(CT).pixel_array[None].astype(np.int16)
    pixels[0, 0, 0] += 3  # a scan the server has not seen
    scene = SimpleNamespace(volume=lambda volume_id: assistant_module.VolumeData(
        "Chest CT", pixels, np.diag([0.66, 0.66, 5.0, 1]), (40.0, 400.0), "1"), regions=lambda: [])
    helper = assistant_module.Assistant(scene, settings=settings.ModelSettings(run_on=settings.RUN_SERVER,
                                                                                server_url=server.url))
    client = helper.connect()
    calls = []
    real_call = client._call
    monkeypatch.setattr(client, "_call", lambda method, path, *a, **k: (calls.append((method, path)),
                                                                         real_call(method, path, *a, **k))[1])
    helper.prepare_ahead(assistant_module.Selection("ct")).join(30)
    assert calls.count(("POST", "/images")) == 1  # uploaded while the radiologist types
    ask = helper.build_ask("vqa", "Is there a nodule?", assistant_module.Selection("ct"))
    final = client.ask(**{**ask, "max_new_tokens": 2}).wait(60)
    assert final.kind == "done", final.text
    assert calls.count(("POST", "/images")) == 1  # the question found it on the server
    helper.close()


def test_a_server_gone_mid_answer_is_reported_like_a_crashed_worker():
    from server_gone import server_gone_mid_answer

    with server_gone_mid_answer(b'event: status\ndata: {"text": "starting", "data": {"ask_id": "a"}}\n\n'
                                b'event: token\ndata: {"text": "The", "data": {}}\n\n') as url:
        events = list(RemoteClient(url, TOKEN).ask("q", images=[CT]).events(30))
    assert [e.kind for e in events] == ["status", "status", "token", "error"]
    assert events[-1].data["kind"] == "worker_died" and "went away mid-answer" in events[-1].text


def test_tls_is_on_when_given_a_certificate(tmp_path, monkeypatch):
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)

    class NoModel:  # the TLS layer does not need a model: health only
        preview_dir = None

        def load(self, *args, **kwargs):
            return {}

        def close(self):
            pass

    port = free_port()
    config = ServeConfig(checkpoint="unused", port=port, token=TOKEN, ssl_certfile=str(cert), ssl_keyfile=str(key))
    config.check()
    uv = uvicorn.Server(uvicorn.Config(create_app(config, worker_factory=NoModel), host="127.0.0.1", port=port,
                                       ssl_certfile=str(cert), ssl_keyfile=str(key), log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        while not uv.started:
            assert thread.is_alive()
            time.sleep(0.05)
        with pytest.raises(WorkerError, match="CERTIFICATE_VERIFY_FAILED"):
            RemoteClient(f"https://127.0.0.1:{port}", TOKEN).hello()  # an unknown certificate is refused
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert RemoteClient(f"https://127.0.0.1:{port}", TOKEN).hello()["tls"] is True
        with pytest.raises(WorkerError, match="cannot reach"):
            RemoteClient(f"http://127.0.0.1:{port}", TOKEN).hello()  # no plain-text fallback
    finally:
        uv.should_exit = True
        thread.join(30)


def test_radfm_ask_with_server_and_token_file(server, tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("not-the-token-at-all-000\n")
    token.chmod(0o600)
    ask_args = ["ask", "--server", server.url, "--token-file", str(token), "--image", CT, "--max-new-tokens", "4"]
    assert radfm(ask_args + ["--question", "q"]) == 2
    assert "refused the token" in capsys.readouterr().err
    token.write_text(TOKEN + "\n")
    assert radfm(ask_args + ["--question", "q", "--json"]) == 0
    turn = json.loads(capsys.readouterr().out)
    assert turn["images"][0]["label"] == "CT_small.dcm" and turn["provenance"]["server"] == server.url


def test_no_token_and_a_bad_address_say_what_to_give(server, tmp_path, capsys):
    ask_args = ["ask", "--image", CT, "--question", "q", "--max-new-tokens", "4"]
    assert radfm(ask_args + ["--server", server.url]) == 2
    err = capsys.readouterr().err
    assert "this server needs a token: pass --token-file FILE" in err and "refused" not in err
    with pytest.raises(WorkerError, match="this server needs a token"):
        RemoteClient(server.url).load()
    for bad in ("notaurl", "127.0.0.1:8765", "ftp://127.0.0.1", "http://127.0.0.1:99999", "http://127.0.0.1:x"):
        assert radfm(ask_args + ["--server", bad]) == 2
        assert capsys.readouterr().err == f"radfm: error: {bad!r} is not an http(s) address (e.g. http://127.0.0.1:8765)\n"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "c1", "images": [CT], "task": "modality", "reference": "CT"}) + "\n")
    assert radfm(["eval", "--server", "notaurl", "--manifest", str(manifest), "--out", str(tmp_path / "run")]) == 2
    assert "'notaurl' is not an http(s) address" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("stop, named_cache", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_stopped_server_removes_the_folders_it_made_and_its_worker(fixture_dir, tmp_path, stop, named_cache):
    """SIGTERM (systemd, docker stop) and Ctrl-C end the worker and remove the upload cache and thumbnail
    folders the server made; a --cache-dir the user named is theirs and stays, uploads and all."""
    import subprocess
    import sys

    temp, cache, log = tmp_path / "tmp", tmp_path / "my-cache", tmp_path / "serve.log"
    temp.mkdir()
    port = free_port()
    command = [sys.executable, "-m", "RadFMSlicer.cli", "serve", "--checkpoint", str(fixture_dir), "--port", str(port)]
    with open(log, "wb") as output:
        serve = subprocess.Popen(command + (["--cache-dir", str(cache)] if named_cache else []),
                                 env=dict(os.environ, TMPDIR=str(temp)), stdout=output, stderr=output)
    try:
        client, deadline = RemoteClient(f"http://127.0.0.1:{port}"), time.monotonic() + 120
        while True:
            try:
                pid = client.load() and client.status()["pid"]
                break
            except WorkerError:
                assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
        made = sorted(p.name.rsplit("-", 1)[0] for p in temp.glob("radfm-*"))
        assert made == ["radfm-previews"] + ([] if named_cache else ["radfm-uploads"])
        assert client.encode([CT]).wait(60).kind == "done"
        serve.send_signal(stop)
        serve.wait(60)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert not list(temp.glob("radfm-*"))
    assert not named_cache or len(list(cache.glob("*.npy"))) == 1
    with pytest.raises(ProcessLookupError):  # the worker was stopped and reaped by its server
        os.kill(pid, 0)


def test_a_case_asked_here_and_on_the_server_gives_the_model_the_same_prompt(server, tiny_checkpoint, tiny_engine,
                                                                              tmp_path, capsys):
    """The same case through `radfm ask` and `radfm ask --server`: the same prompt token ids (regions are
    'mask 1', 'box 2' on both sides), while the mask's file name stays here."""
    import re

    import SimpleITK as sitk

    volume = sitk.ReadImage(CT)
    mask = sitk.GetImageFromArray(np.pad(np.ones((1, 20, 20), np.uint8), ((0, 0), (40, 68), (50, 58))))
    mask.CopyInformation(volume)
    sitk.WriteImage(mask, str(tmp_path / "Quxworth_lesion.nii.gz"))
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    case = ["--image", CT, "--image", CT, "--region", str(tmp_path / "Quxworth_lesion.nii.gz"), "--box-ijk",
            "10,20,0,40,60,0", "--history", "58 y, cough", "--question", "Any fluid", "--max-new-tokens", "3", "--json"]
    turns = []
    for where in (["--checkpoint", str(tiny_checkpoint)], ["--server", server.url, "--token-file", str(token)]):
        assert radfm(["ask", *where, *case]) == 0
        turns.append(json.loads(capsys.readouterr().out))
    here, there = turns

    def prompt_ids(turn):  # the stored prompt shows each image tag as <image k>: put the tags back
        return tiny_engine.tokenize(re.sub(r"<image (\d+)>", lambda m: tiny_engine.image_tag(int(m[1]) - 1),
                                           turn["prompt"]))

    assert 'marked region "mask 1"' in here["prompt"] and 'marked region "box 2"' in here["prompt"]
    assert prompt_ids(there) == prompt_ids(here)
    assert there["provenance"]["timing"]["prompt_tokens"] == here["provenance"]["timing"]["prompt_tokens"] == len(
        prompt_ids(here))
    assert there["answer"] == here["answer"]
    assert [i["label"] for i in there["images"]] == [i["label"] for i in here["images"]] == [
        "CT_small.dcm", "CT_small.dcm", "mask 1", "box 2"]
