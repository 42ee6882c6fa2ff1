"""What every benchmark shares: real RadFM sizes, random models, timing, memory, result lines."""

import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn

from RadFMSlicer.checkpoint import build_llama_config
from RadFMSlicer.generation import GenerationSettings
from RadFMSlicer.model import RadFMDims, RadFMModel

PROJECT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("RADFM_FIXTURE", PROJECT.parent / "shared" / "fixtures" / "radfm-tiny"))
RESULTS = PROJECT / "bench" / "results"

# The released RadFM (MedLLaMA-13B + 3D ViT-B + perceiver), from the design notes.
REAL_DIMS = RadFMDims(
    vocab_size=32000, llm_dim=5120, llm_layers=40, llm_intermediate=13824,
    vision_dim=768, vision_layers=12, vision_inner=512, vision_mlp=2048,
    h_patches=16, w_patches=16, d_patches=128,
    perceiver_layers=6, perceiver_inner=512, perceiver_ff=3072, num_latents=32,
)
TINY_VISION = dict(vision_dim=48, vision_layers=1, vision_inner=64, vision_mlp=96,
                   perceiver_layers=1, perceiver_inner=64, perceiver_ff=96)
MEDIUM_LLM = dict(llm_dim=2048, llm_layers=8, llm_intermediate=5504)  # ~0.5 B parameters
CT_GEOMETRY = np.diag([-0.7, -0.7, 2.5, 1.0])  # the benchmarks' CT, ijk -> RAS: 0.7 mm in-plane, 2.5 mm slices


def tokenizer_model() -> Path:
    path = FIXTURE / "Language_files" / "tokenizer.model"
    if not path.is_file():
        raise SystemExit(f"the benchmarks need the RadFM tokenizer of the fixture: {path} not found "
                         f"(set RADFM_FIXTURE=<folder of radfm-tiny>)")
    return path


def llama_config_dict(dims: RadFMDims) -> dict:
    """A LLaMA config.json for ``dims`` (heads of 128 as in LLaMA-13B)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": dims.vocab_size,
        "hidden_size": dims.llm_dim, "intermediate_size": dims.llm_intermediate,
        "num_hidden_layers": dims.llm_layers, "num_attention_heads": max(1, dims.llm_dim // 128),
        "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1,
    }


def random_model(dims: RadFMDims) -> RadFMModel:
    """A RadFM model with random weights of the usual scale, in float32 on the CPU."""
    torch.manual_seed(0)
    model = RadFMModel(dims, build_llama_config(llama_config_dict(dims), dims, "benchmark"))
    for name, param in model.named_parameters():
        if name.endswith(("latents", "figure_token_weight")):  # created empty
            nn.init.normal_(param, std=0.5)
    return model.eval().requires_grad_(False)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class PeakRSS:
    """Samples this process's RSS every 2 ms while the block runs."""

    def __enter__(self):
        self.before = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def extra(self) -> float:
        return self.peak - self.before


def compare(calls: dict, repeats: int, warmup: bool = True) -> dict:
    """``{name: (best seconds, peak RSS MB, extra RSS MB)}`` of each call.

    The calls take turns, round after round, so that a slow spell of this shared
    machine hits all of them alike; the best round counts. ``warmup`` adds an untimed
    first round. A call that returns a float has timed itself (e.g. per token).
    """
    times = {name: [] for name in calls}
    peak = dict.fromkeys(calls, 0.0)
    extra = dict.fromkeys(calls, 0.0)
    with torch.inference_mode():
        for round_ in range(repeats + warmup):
            for name, fn in calls.items():
                with PeakRSS() as memory:
                    start = time.perf_counter()
                    own = fn()
                    seconds = own if isinstance(own, float) else time.perf_counter() - start
                if round_ >= warmup:
                    times[name].append(seconds)
                peak[name], extra[name] = max(peak[name], memory.peak), max(extra[name], memory.extra)
    return {name: (min(times[name]), peak[name], extra[name]) for name in calls}


def engine_first_token_s(engine, prompt: str, images) -> float:
    """Seconds from a question to its first token through ``engine.stream`` (encode unless cached,
    embed, prefill): the run's wall time less the part after the first token."""
    start = time.perf_counter()
    result = engine.stream(prompt, images, GenerationSettings(max_new_tokens=1)).run()
    return time.perf_counter() - start - result.total_s + result.time_to_first_token_s


def memory_fields(peak_mb: float, extra_mb: float) -> dict:
    return {"peak_rss_mb": round(peak_mb), "extra_rss_mb": round(extra_mb), "memory": f"+{extra_mb:.0f} MB working"}


@dataclasses.dataclass
class Result:
    """One line of output. ``group`` rows are compared with the group's ``baseline`` row."""

    what: str
    group: str
    variant: str
    settings: dict
    time_s: float
    baseline: bool = False
    extra: dict = dataclasses.field(default_factory=dict)


class Recorder:
    """Prints each result as a JSON line and appends it to ``results/<name>.jsonl``."""

    def __init__(self, out_file: Path):
        self.out_file = out_file
        self.results: list[Result] = []
        out_file.parent.mkdir(parents=True, exist_ok=True)
        self.run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": _cpu_name()}

    def add(self, result: Result) -> None:
        self.results.append(result)
        base = self.baseline_of(result)
        line = {"what": result.what, "group": result.group, "variant": result.variant,
                "settings": result.settings, "time_s": round(result.time_s, 4), **result.extra,
                "x_baseline": round(result.time_s / base.time_s, 3) if base else None, "run": self.run}
        print(json.dumps(line), flush=True)
        with open(self.out_file, "a") as f:
            f.write(json.dumps(line) + "\n")

    def baseline_of(self, result: Result) -> Result | None:
        return next((r for r in self.results if r.group == result.group and r.baseline), None)

    def table(self) -> str:
        rows = [("group", "variant", "time s", "x base", "memory")]
        for r in self.results:
            base = self.baseline_of(r)
            rows.append((r.group, r.variant + (" [baseline]" if r.baseline else ""), f"{r.time_s:.3f}",
                         f"{r.time_s / base.time_s:.2f}" if base else "", r.extra.get("memory", "")))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
