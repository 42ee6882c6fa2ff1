"""radfm eval --server: the same run answered by a radfm serve on 127.0.0.1 (the tiny checkpoint)."""

import json
from pathlib import Path

import pydicom.data
import pytest

pytest.importorskip("fastapi")

from RadFMSlicer.ask import AskRequest, ImageInput  # noqa: E402
from RadFMSlicer.cli import main as radfm  # noqa: E402
from RadFMSlicer.errors import RadFMError  # noqa: E402
from RadFMSlicer.evaluation.datasets import load_manifest  # noqa: E402
from RadFMSlicer.evaluation.run import read_cases, run_eval  # noqa: E402
from RadFMSlicer.generation import GenerationSettings  # noqa: E402
from RadFMSlicer.http_client import ServerUnavailable  # noqa: E402
from RadFMSlicer.remote import RemoteClient, RemoteRequest, ask_server  # noqa: E402
from RadFMSlicer.worker import Event  # noqa: E402
from test_server import CT, TOKEN, free_port, server  # noqa: E402,F401 (server: the module's own radfm serve)

MR = pydicom.data.get_testdata_file("MR_small.dcm")


def manifest(tmp_path: Path) -> Path:
    rows = [{"id": "ct-modality", "images": [CT], "task": "modality", "reference": "CT"},
            {"id": "mr-report", "images": [MR], "task": "report", "reference": "MR of the head."},
            {"id": "ct-effusion", "images": [CT], "task": "diagnosis", "question": "pleural effusion",
             "reference": "no"}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def token_file(tmp_path: Path, token: str = TOKEN) -> str:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return str(path)


def by_id(run: Path) -> dict:
    return {r["id"]: r for r in read_cases(run)}


def test_eval_on_a_server_answers_as_here_and_resumes(server, tiny_engine, tmp_path, capsys):
    cases = load_manifest(manifest(tmp_path))
    run_eval(tiny_engine, cases, tmp_path / "here", GenerationSettings(max_new_tokens=4), progress=False)
    args = ["eval", "--server", server.url, "--token-file", token_file(tmp_path), "--manifest",
            str(manifest(tmp_path)), "--out", str(tmp_path / "there"), "--max-new-tokens", "4"]
    assert radfm(args) == 0
    here, there = by_id(tmp_path / "here"), by_id(tmp_path / "there")
    assert set(there) == {"ct-modality", "mr-report", "ct-effusion"}
    for case_id, local in here.items():
        remote = there[case_id]
        assert remote["answer"] == local["answer"] and remote["prompt"] == local["prompt"]
        assert remote["scores"] == local["scores"]
        for a, b in zip(remote["seen"], local["seen"]):  # the same tensor, named here, drawn here
            assert (a["label"], a["source"], a["shape"], a["window"]) == (b["label"], b["source"], b["shape"], b["window"])
            assert (tmp_path / "there" / a["preview_png"]).is_file()
        assert remote["provenance"]["server"] == server.url
        assert remote["run_settings"]["server"] == server.url and "checkpoint" not in remote["run_settings"]
    summary = json.loads((tmp_path / "there" / "summary.json").read_text())
    assert summary["cases"] == {"total": 3, "answered": 3, "failed": 0, "not_run": 0}
    assert summary["model"]["server"] == server.url and (tmp_path / "there" / "index.html").is_file()

    out = tmp_path / "there" / "cases.jsonl"
    first, second = out.read_text().splitlines()[:2]
    out.write_text(first + "\n" + second[: len(second) // 2])  # killed while writing the second record
    capsys.readouterr()
    assert radfm(args) == 0
    summary = json.loads((tmp_path / "there" / "summary.json").read_text())
    assert summary["last_run"]["skipped_as_done"] == 1 and summary["last_run"]["answered"] == 2
    assert {k: r["answer"] for k, r in by_id(tmp_path / "there").items()} == {k: r["answer"] for k, r in here.items()}

    # a run made on the server is not resumed here, nor one made here on the server, unless --force
    with pytest.raises(RadFMError, match=r"other settings \(checkpoint: None -> '\w+'.*server: '.*' -> None.*--force"):
        run_eval(tiny_engine, cases, tmp_path / "there", GenerationSettings(max_new_tokens=4), progress=False)
    capsys.readouterr()
    onto_local = args[:-4] + ["--out", str(tmp_path / "here"), "--max-new-tokens", "4"]
    assert radfm(onto_local) == 2
    assert f"server: None -> '{server.url}'" in capsys.readouterr().err
    assert radfm(onto_local + ["--force"]) == 0


def test_eval_server_refusals_are_one_line_before_any_answer(server, tiny_checkpoint, tmp_path, capsys):
    good = ["--manifest", str(manifest(tmp_path)), "--out", str(tmp_path / "run")]
    wrong = ["eval", "--server", server.url, "--token-file", token_file(tmp_path, "not-the-token-at-all-000")]
    assert radfm(wrong + good) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("radfm: error: the RadFM server answered 401") and "refused the token" in err[-1]
    assert not (tmp_path / "run" / "cases.jsonl").exists()

    bad_manifest = tmp_path / "bad.jsonl"
    bad_manifest.write_text(json.dumps({"images": ["nope.dcm"], "task": "report", "reference": "x"}) + "\n")
    assert radfm(wrong + ["--manifest", str(bad_manifest), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "image not found" in err and "token" not in err  # the manifest is checked before the server is asked

    assert radfm(["eval", "--server", server.url, "--checkpoint", str(tiny_checkpoint)] + good) == 2
    assert "--checkpoint FOLDER (the model here) or --server URL (a radfm serve), not both" in capsys.readouterr().err
    assert radfm(["eval", "--server", server.url, "--dtype", "bfloat16", "--quantization", "int8"] + good) == 2
    assert "--dtype, --quantization set the model loaded here; with --server the server's own" in capsys.readouterr().err
    assert radfm(["eval", "--server", server.url, "--token-file", token_file(tmp_path), "--attention"] + good) == 2
    assert "--attention needs the model in this process" in capsys.readouterr().err


@pytest.mark.parametrize("change, error", [
    ("url", "cannot reach the RadFM server"),  # stopped, or the network dropped
    ("token", "the RadFM server answered 401: the RadFM server refused the token"),  # the token changed on the server
])
def test_a_server_gone_mid_run_keeps_the_case_with_its_error_and_stops(server, tmp_path, change, error):
    class GoesAway(RemoteClient):
        asks = 0

        def ask(self, *args, **kwargs):
            self.asks += 1
            if self.asks == 2 and change == "url":
                self.url = f"http://127.0.0.1:{free_port()}"  # nothing listens there any more
            if self.asks == 2 and change == "token":
                self.token = "not-the-token-at-all-000"
            return super().ask(*args, **kwargs)

    cases = load_manifest(manifest(tmp_path))
    run = tmp_path / "run"
    with pytest.raises(RadFMError, match=rf"stopped at case 'ct-effusion': {error}.*rerun"):
        run_eval(GoesAway(server.url, TOKEN), cases, run, GenerationSettings(max_new_tokens=3), progress=False)
    records = by_id(run)
    assert set(records) == {"ct-modality", "ct-effusion"} and "answer" in records["ct-modality"]
    assert error in records["ct-effusion"]["error"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["cases"] == {"total": 3, "answered": 1, "failed": 1, "not_run": 1}
    summary = run_eval(RemoteClient(server.url, TOKEN), cases, run, GenerationSettings(max_new_tokens=3),
                       progress=False)
    assert summary["last_run"] == summary["last_run"] | {"skipped_as_done": 1, "answered": 2, "failed": 0}


def test_an_answer_dropped_mid_stream_is_server_gone(monkeypatch):
    client = RemoteClient("http://127.0.0.1:1")
    dropped = RemoteRequest(client, "r1", "ask")
    dropped.push(Event("error", "the RadFM server went away mid-answer", {"kind": "worker_died"}))
    monkeypatch.setattr(client, "ask", lambda **kwargs: dropped)
    with pytest.raises(ServerUnavailable, match="went away"):
        ask_server(client, AskRequest(task="modality", images=[ImageInput(path=CT)]))
    refused = RemoteRequest(client, "r2", "ask")
    refused.push(Event("error", "unknown task", {"kind": "RadFMError"}))  # the question's fault: not gone
    monkeypatch.setattr(client, "ask", lambda **kwargs: refused)
    with pytest.raises(RadFMError) as raised:
        ask_server(client, AskRequest(task="modality", images=[ImageInput(path=CT)]))
    assert not isinstance(raised.value, ServerUnavailable)
