"""The LLM half on vLLM: the exported Llama folder, the prompt_embeds request, the streamed answer.

The stand-in below speaks vLLM's OpenAI-compatible Completions protocol on 127.0.0.1 as
vLLM 0.32 streams it and computes with the exported folder loaded by transformers,
decoding ``prompt_embeds`` exactly as vLLM's renderer does: fast, and able to fail on cue.
Real vLLM (its CPU build, in a venv of its own) is met in ``vllm_lane/``, a CI step of its own.
"""

import base64
import io
import json
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom.data
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from RadFMSlicer.cli import main as radfm
from RadFMSlicer.engine import RadFMEngine
from RadFMSlicer.errors import PromptError, RadFMError
from RadFMSlicer.generation import GenerationSettings
from RadFMSlicer.testing import free_port, serving
from RadFMSlicer.vllm_client import prompt_embeds_field


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, fixture_dir):
    out = tmp_path_factory.mktemp("vllm") / "radfm-llama"
    assert radfm(["convert", "--for-vllm", "--checkpoint", str(fixture_dir), "--out", str(out),
                  "--dtype", "float32", "--shard-size-gb", "0.004"]) == 0
    return out


def vllm_decode(field: str) -> torch.Tensor:
    """vLLM's documented decoding of ``prompt_embeds`` (entrypoints renderer)."""
    tensor = torch.load(io.BytesIO(base64.b64decode(field, validate=True)), weights_only=True,
                        map_location=torch.device("cpu"))
    assert isinstance(tensor, torch.Tensor) and tensor.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return tensor.to_dense()


def test_exported_folder_is_a_plain_llama_with_our_logits(llama_folder, engine, fixture_cases):
    config = json.loads((llama_folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["eos_token_id"] == 2
    assert config["max_position_embeddings"] == 2048
    assert json.loads((llama_folder / "generation_config.json").read_text())["eos_token_id"] == 2
    index = json.loads((llama_folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 2 and "lm_head.weight" in index
    assert not any(k.startswith(("embedding_layer", "lang_model")) for k in index)

    llama = LlamaForCausalLM.from_pretrained(llama_folder, dtype=torch.float32)
    for case in fixture_cases["cases"]:
        ids = case["input_ids"].unsqueeze(0)
        embeds = engine.embed(ids, engine.split_vision_x(case["vision_x"]))
        with torch.inference_mode():
            ours = engine.model.lang_model(inputs_embeds=embeds).logits
            theirs = llama(inputs_embeds=embeds).logits
        assert torch.equal(ours, theirs), case["name"]
        assert (theirs[0] - case["prefill_logits"]).abs().max() < 1e-4

    tokenizer = AutoTokenizer.from_pretrained(llama_folder)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    answer = [i for i in fixture_cases["cases"][0]["generated_ids"].tolist()[1:] if i != 2]
    assert tokenizer.decode(answer, skip_special_tokens=True) == engine.tokenizer.decode(answer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_embeds_decode_with_vllms_decoding_to_the_same_tensor(engine, fixture_cases, dtype):
    case = fixture_cases["cases"][1]
    embeds = engine.embed(case["input_ids"].unsqueeze(0), engine.split_vision_x(case["vision_x"])).to(dtype)
    field = prompt_embeds_field(embeds)  # [1, L, hidden] in, [L, hidden] on the wire
    decoded = vllm_decode(field)
    assert decoded.dtype == dtype and decoded.shape == embeds.shape[1:]
    assert torch.equal(decoded, embeds[0])
    head = embeds[0, :4]  # a view: only its own rows go on the wire, not the storage behind it
    assert torch.equal(vllm_decode(prompt_embeds_field(head)), head)
    assert len(base64.b64decode(prompt_embeds_field(head))) < head.nbytes + 2048 < embeds.nbytes


ENGINE_DEAD = {"message": "EngineCore encountered an issue. See stack trace (above) for the root cause.",
               "type": "InternalServerError", "param": None, "code": 500}


def closed_by_client(connection: socket.socket) -> bool:
    """Whether the client closed its side: readable with nothing to read (it sends nothing after its request)."""
    if not select.select([connection], [], [], 0)[0]:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class FakeVLLM(ThreadingHTTPServer):
    """vLLM's Completions protocol on 127.0.0.1, greedy on the exported folder, streamed as vLLM 0.32 streams
    it (the finish reason on the last token's chunk, id/created/logprobs/stop_reason/prompt_token_ids, usage with
    total_tokens). ``max_model_len``: its context limit, said in /v1/models and enforced (400) as vLLM does.
    ``fail_after`` / ``cut_after`` tokens: then vLLM's in-stream error after the 200 / a connection closed short."""

    daemon_threads = True

    def __init__(self, folder, max_model_len=2048):
        super().__init__(("127.0.0.1", 0), VLLMHandler)
        self.llama = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.name = str(folder)
        self.max_model_len = max_model_len
        self.fail_after = self.cut_after = None
        self.token_delay_s = 0.0  # per token: long enough answers overlap, as vLLM's do
        self.bodies = []
        self.open_answers = set()  # the connections of answers being written that the client has not closed
        self.most_in_flight = 0
        self.lock = threading.Lock()

    def count_in(self, connection) -> None:
        """An answer starts: the most ever in flight, counting only answers whose reader is still connected (one
        cancelled or finished may not have been noticed yet by its thread, as vLLM notices an abort a little late)."""
        with self.lock:
            self.open_answers = {c for c in self.open_answers if not closed_by_client(c)} | {connection}
            self.most_in_flight = max(self.most_in_flight, len(self.open_answers))

    def count_out(self, connection) -> None:
        with self.lock:
            self.open_answers.discard(connection)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class VLLMHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _json(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        assert self.path == "/v1/models"
        self._json(200, {"object": "list", "data": [{"id": self.server.name, "object": "model", "owned_by": "vllm",
                                                     "root": self.server.name, "max_model_len": self.server.max_model_len}]})

    def do_POST(self):
        assert self.path == "/v1/completions"
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        if body.get("model") != self.server.name:
            return self._json(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                              "type": "NotFoundError", "param": "model", "code": 404}})
        embeds = vllm_decode(body["prompt_embeds"]).unsqueeze(0)
        prompt_len, limit = embeds.shape[1], self.server.max_model_len
        if prompt_len + body["max_tokens"] > limit:
            return self._json(400, {"error": {"message": f"This model's maximum context length is {limit} tokens. "
                                              f"However, you requested {body['max_tokens']} output tokens and your "
                                              f"prompt contains {prompt_len} input tokens.", "type": "BadRequestError",
                                              "param": None, "code": 400}})
        self.server.count_in(self.connection)
        try:
            self._stream(body, embeds)
        finally:
            self.server.count_out(self.connection)

    def _stream(self, body, embeds):
        prompt_len = embeds.shape[1]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        head = {"id": "cmpl-fake", "object": "text_completion", "created": 1796660217, "model": self.server.name}
        ids, text, finish = [], "", None
        with torch.inference_mode():
            while finish is None:
                if len(ids) == self.server.fail_after:
                    self._event({"error": ENGINE_DEAD})
                    return self.wfile.write(b"data: [DONE]\n\n")
                if len(ids) == self.server.cut_after:
                    return  # the connection closes: no finish reason, no [DONE]
                time.sleep(self.server.token_delay_s)
                token = int(self.server.llama(inputs_embeds=embeds).logits[0, -1].argmax())
                ids.append(token)
                finish = "stop" if token in body["stop_token_ids"] else "length" if len(ids) == body["max_tokens"] else None
                embeds = torch.cat([embeds, self.server.llama.get_input_embeddings()(torch.tensor([[token]]))], 1)
                full = self.server.tokenizer.decode(ids, skip_special_tokens=True)
                self._event({**head, "choices": [{
                    "index": 0, "text": full[len(text):], "logprobs": None, "finish_reason": finish, "stop_reason": None,
                    "prompt_token_ids": [0] * prompt_len if len(ids) == 1 else None, "token_ids": [token]}]})
                text = full
        self._event({**head, "choices": [], "usage": {"prompt_tokens": prompt_len, "total_tokens": prompt_len + len(ids),
                                                      "completion_tokens": len(ids)}})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, chunk):
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()


@pytest.fixture(scope="module")
def fake_vllm(llama_folder):
    server = FakeVLLM(llama_folder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def vllm(fake_vllm):
    """The stand-in, back to answering in full after the test."""
    yield fake_vllm
    fake_vllm.fail_after = fake_vllm.cut_after = None
    fake_vllm.max_model_len = 2048
    fake_vllm.token_delay_s = 0.0
    fake_vllm.most_in_flight = 0


def test_answers_streamed_from_vllm_equal_our_own(fake_vllm, fixture_dir, engine, fixture_cases):
    remote = RadFMEngine.load(fixture_dir, dtype=torch.float32, vllm_url=fake_vllm.url + "/v1")
    assert remote.describe()["llm_backend"] == "vllm" and remote.describe()["vllm_model"] == fake_vllm.name
    # the vision side holds no LLaMA layers: they live in vLLM
    assert len(remote.model.lang_model.model.layers) == 0 and remote.model.lang_model.lm_head is None
    held = sum(p.numel() for p in remote.model.parameters())
    assert held == sum(p.numel() for p in engine.model.parameters()) - sum(
        p.numel() for n, p in engine.model.named_parameters() if n.startswith(("lang_model.model.layers",
                                                                              "lang_model.model.norm", "lang_model.lm_head")))
    with pytest.raises(RadFMError, match="holds no LLM layers"):
        remote.logits(fixture_cases["cases"][0]["input_ids"].unsqueeze(0), fixture_cases["cases"][0]["vision_x"])
    for case in fixture_cases["cases"]:
        ids, images = case["input_ids"].unsqueeze(0), engine.split_vision_x(case["vision_x"])
        settings = GenerationSettings(max_new_tokens=24)
        local = engine.start(ids, images, settings)
        expected = local.run()
        generation = remote.start(ids, images, settings)
        deltas = list(generation)
        assert "".join(deltas) == expected.text == generation.result.text, case["name"]
        assert generation.result.token_ids == expected.token_ids
        assert generation.result.stop_reason == expected.stop_reason
    body = fake_vllm.bodies[-1]
    assert body["stream"] is True and body["max_tokens"] == 24 and body["temperature"] == 0.0
    assert "prompt" not in body  # embeddings only: the prompt text never goes to vLLM


def test_unreachable_or_refusing_vllm_is_one_clear_line(fixture_dir, fake_vllm):
    with pytest.raises(RadFMError, match=r"cannot reach the vLLM server at http://127\.0\.0\.1:9"):
        RadFMEngine.load(fixture_dir, vllm_url="http://127.0.0.1:9")
    from RadFMSlicer.vllm_client import VLLMBackend

    backend = VLLMBackend(fake_vllm.url)
    backend.model = "not-served"  # renamed on the vLLM side after we connected
    generation = backend.start(torch.tensor([[1, 2, 3]]), torch.zeros(3, 64), GenerationSettings(), 2048)
    with pytest.raises(RadFMError, match="refused the answer \\(404\\): The model `not-served` does not exist"):
        list(generation)


def test_the_worker_and_radfm_serve_pass_the_vllm_server_on(fake_vllm, fixture_dir, capsys):
    from RadFMSlicer.worker import WorkerClient

    with WorkerClient.start() as worker:
        model = worker.load(fixture_dir, dtype="float32", vllm_url=fake_vllm.url)["model"]
    assert model["llm_backend"] == "vllm" and model["vllm_url"] == fake_vllm.url
    assert radfm(["serve", "--checkpoint", str(fixture_dir), "--llm-backend", "vllm"]) == 2
    assert "--llm-backend vllm needs --vllm-url" in capsys.readouterr().err
    assert radfm(["serve", "--checkpoint", str(fixture_dir), "--vllm-max-num-seqs", "4"]) == 2
    assert capsys.readouterr().err.strip().endswith("--vllm-max-num-seqs is how many answers vLLM writes at once: "
                                                    "it needs --llm-backend vllm")
    assert radfm(["serve", "--checkpoint", str(fixture_dir), "--llm-backend", "vllm", "--vllm-url", fake_vllm.url,
                  "--vllm-max-num-seqs", "0"]) == 2
    assert "--vllm-max-num-seqs must be positive" in capsys.readouterr().err
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    assert radfm(["serve", "--checkpoint", str(fixture_dir), "--port", port, "--llm-backend", "vllm",
                  "--vllm-url", "http://127.0.0.1:9"]) == 2  # the worker's load fails: one line, nothing served
    err = capsys.readouterr().err
    assert "radfm: error: the model did not load, so nothing is served: cannot reach the vLLM server" in err
    assert "Traceback" not in err


CT = pydicom.data.get_testdata_file("CT_small.dcm")


@pytest.mark.parametrize("failure", ["error", "cut"])
def test_a_vllm_failing_mid_answer_is_an_error_and_the_words_so_far_are_kept(vllm, fixture_dir, capsys, tmp_path,
                                                                              failure):
    """vLLM's error inside its 200 stream, or a stream closed short (vLLM killed): not a cancelled answer."""
    setattr(vllm, f"{failure}_after" if failure == "cut" else "fail_after", 4)
    session = tmp_path / "s.json"
    code = radfm(["ask", "--checkpoint", str(fixture_dir), "--dtype", "float32", "--llm-backend", "vllm",
                  "--vllm-url", vllm.url, "--image", CT, "--question", "Is there fluid", "--max-new-tokens", "12",
                  "--session", str(session)])
    out, err = capsys.readouterr()
    last = err.splitlines()[-1]
    assert code == 2 and out.strip() and "[stopped" not in err
    said = "EngineCore encountered an issue" if failure == "error" else "ended the answer without finishing it"
    assert last.startswith("radfm: error: the vLLM server") and said in last
    assert last.endswith(f"the answer so far was added to {session} (stop reason: error)")
    turn = json.loads(session.read_text())["turns"][-1]
    assert turn["stop_reason"] == "error" and said in turn["error"] and turn["answer"] == out.strip()


def test_the_worker_tells_vllms_own_message_after_the_words_so_far(vllm, fixture_dir):
    from RadFMSlicer.worker import WorkerClient

    vllm.fail_after = 3
    with WorkerClient.start() as worker:
        worker.load(fixture_dir, dtype="float32", vllm_url=vllm.url)
        events = list(worker.ask(question="Is there fluid", images=[{"path": CT}], max_new_tokens=12).events(300))
    kinds = [e.kind for e in events]
    assert "token" in kinds and kinds[-1] == "error", kinds
    assert "the vLLM server failed mid-answer: EngineCore encountered an issue" in events[-1].text


def test_the_context_limit_is_the_vllm_servers(vllm, fixture_dir, engine, fixture_cases):
    """vLLM started with a --max-model-len below the checkpoint's 2048: budgeted against, refused before sending."""
    case = fixture_cases["cases"][0]
    ids, images = case["input_ids"].unsqueeze(0), engine.split_vision_x(case["vision_x"])
    prompt = ids.shape[1]
    vllm.max_model_len = prompt + 5
    remote = RadFMEngine.load(fixture_dir, dtype=torch.float32, vllm_url=vllm.url)
    assert remote.describe()["vllm_max_model_len"] == prompt + 5
    cut = remote.start(ids, images, GenerationSettings(max_new_tokens=24))
    text = "".join(cut)
    local = engine.start(ids, images, GenerationSettings(max_new_tokens=5)).run()
    assert cut.result.token_ids == local.token_ids and text == local.text and len(local.token_ids) == 5
    assert cut.result.stop_reason == ("eos" if local.stop_reason == "eos" else "context")

    vllm.max_model_len = prompt
    remote = RadFMEngine.load(fixture_dir, dtype=torch.float32, vllm_url=vllm.url)
    sent = len(vllm.bodies)
    with pytest.raises(PromptError, match=rf"^the prompt has {prompt} tokens; the vLLM server's context "
                                          rf"\(its --max-model-len\) holds {prompt}$"):
        remote.start(ids, images, GenerationSettings(max_new_tokens=24))
    assert len(vllm.bodies) == sent  # refused here: nothing went to vLLM


def test_radfm_serve_writes_answers_together_on_vllm_and_queues_fairly_past_its_limit(vllm, fixture_dir, tmp_path):
    """Encoding in our worker, generation in vLLM: as many answers in flight as --vllm-max-num-seqs, the next
    reader told how many are ahead, each answer the one it gets alone, a reader who leaves stops only his."""
    from RadFMSlicer.remote import RemoteClient
    from RadFMSlicer.worker.http import ServeConfig, create_app

    port = free_port()
    config = ServeConfig(checkpoint=str(fixture_dir), port=port, dtype="float32", vllm_url=vllm.url,
                         vllm_max_num_seqs=2, cache_dir=str(tmp_path / "uploads"))
    with serving(create_app(config), port, start_timeout_s=300):
        url = f"http://127.0.0.1:{port}"
        questions = ["Is there fluid", "Is the heart enlarged", "Is there a nodule"]
        solo = [RemoteClient(url).ask(q, images=[CT], max_new_tokens=6).result(300)["answer"] for q in questions]
        vllm.token_delay_s = 0.3
        asks = [RemoteClient(url).ask(q, images=[CT], max_new_tokens=6) for q in questions]
        leaving = RemoteClient(url).ask("Is there fluid", images=[CT], max_new_tokens=6)
        left = []
        for event in leaving.events(300):
            left.append(event)
            if event.kind == "token":
                leaving.cancel()
        events = [list(a.events(300)) for a in asks]
        assert [e[-1].data.get("answer") for e in events] == solo  # the order they were written in changes nothing
        assert left[-1].data.get("stop_reason") == "cancelled"  # the reader who left stopped only his own
        assert vllm.most_in_flight == 2  # two at once, never more: the other two waited in our queue
        ahead = sorted(next(e.data["ahead"] for e in seen if "ahead" in e.data) for seen in [*events, left])
        assert ahead == [0, 0, 2, 3]  # told as they queued: the two running ones hold the slots they wait for
