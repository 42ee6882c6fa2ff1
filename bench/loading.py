"""Loading a multi-GB checkpoint: peak RSS and wall time, each load in a fresh process.

A random checkpoint in the official layout at the real widths (LLaMA 5120 x 13824,
vocab 32000, the full vision side) with 3 decoder layers (1 with --quick) is written to
``$RADFM_BENCH_DIR`` (default /tmp/radfm-bench), then converted to safetensors. Each
load runs in a new interpreter (``python -m bench.loading load ...``), after the files
were evicted from the page cache, and reports the kernel's high-water mark of its own
address space (``VmHWM``; ``ru_maxrss`` would include the parent's RSS at fork time).

"off" is the official way: build the model (random init), ``torch.load`` the whole
file, ``load_state_dict``, then cast. "ours" is ``RadFMEngine.load``.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import REAL_DIMS, Result, llama_config_dict, rss_mb, tokenizer_model

WORK = Path(os.environ.get("RADFM_BENCH_DIR", "/tmp/radfm-bench"))


def write_checkpoint(folder: Path, layers: int) -> Path:
    """A random RadFM checkpoint at real widths with ``layers`` LLM layers (reused if already there)."""
    from RadFMSlicer.checkpoint import build_llama_config
    from RadFMSlicer.model import RadFMModel

    dims = dataclasses.replace(REAL_DIMS, llm_layers=layers)
    spec = json.dumps(dataclasses.asdict(dims))
    if (folder / "bench_spec.json").is_file() and (folder / "bench_spec.json").read_text() == spec:
        return folder
    (folder / "Language_files").mkdir(parents=True, exist_ok=True)
    (folder / "Language_files" / "config.json").write_text(json.dumps(llama_config_dict(dims)))
    (folder / "Language_files" / "tokenizer.model").write_bytes(tokenizer_model().read_bytes())
    with torch.device("meta"):
        shapes = RadFMModel(dims, build_llama_config(llama_config_dict(dims), dims, "bench")).state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.empty(meta.shape).normal_(0, 0.02, generator=generator) for key, meta in shapes.items()}
    state["embedding_layer.weight"] = state["lang_model.model.embed_tokens.weight"]  # shared, as released
    torch.save(state, folder / "pytorch_model.bin")
    del state
    (folder / "bench_spec.json").write_text(spec)
    return folder


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache, so every load reads the disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def weights_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*") if p.suffix in (".bin", ".safetensors"))


# --- what runs in the fresh process ---------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident memory since exec (Linux ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the loading benchmark needs Linux")

def plain_load(folder: Path, dtype: torch.dtype):
    """The official way: a full model, the whole state dict in RAM, load_state_dict, cast."""
    from RadFMSlicer.checkpoint import is_inference_key, llama_config, locate_checkpoint
    from RadFMSlicer.model import RadFMDims, RadFMModel

    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    files = locate_checkpoint(folder)
    dims = RadFMDims.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    model = RadFMModel(dims, llama_config(files, dims))
    model.load_state_dict({k: v for k, v in state.items() if is_inference_key(k)})
    del state
    return model.to(dtype)


def worker(argv: list[str]) -> None:
    command, folder, *rest = argv
    folder = Path(folder)
    baseline = rss_mb()
    start = time.perf_counter()
    if command == "write":
        write_checkpoint(folder, int(rest[0]))
        print(json.dumps({}))
        return
    if command == "convert":
        from RadFMSlicer.convert import convert_checkpoint

        convert_checkpoint(folder, Path(rest[1]), rest[0])
        check = None
    else:
        method, dtype = rest
        if method == "plain":
            model = plain_load(folder, getattr(torch, dtype))
        else:
            from RadFMSlicer.engine import RadFMEngine

            model = RadFMEngine.load(folder, dtype=dtype).model
        check = float(model.lang_model.lm_head.weight.sum())  # summed in its own dtype: no float32 copy
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    print(json.dumps({"time_s": seconds, "peak_rss_mb": peak, "import_rss_mb": baseline, "check": check}))


def in_fresh_process(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.loading", *args], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    if out.returncode:
        raise RuntimeError(f"bench.loading {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the benchmark --------------------------------------------------------------------------
def run(recorder, quick: bool) -> None:
    layers = 1 if quick else 3
    official = WORK / f"official-{layers}L"
    in_fresh_process("write", str(official), str(layers))  # the random weights never touch this process
    file_bytes = weights_size(official)
    file_gb = file_bytes / 1e9
    converted = {}
    for dtype in ("bfloat16", "float32"):
        converted[dtype] = WORK / f"safetensors-{layers}L-{dtype}"
        if not (converted[dtype] / "radfm_manifest.json").is_file():
            subprocess.run(["rm", "-rf", str(converted[dtype])], check=True)
            evict(official)
            stats = in_fresh_process("convert", str(official), dtype, str(converted[dtype]))
            recorder.add(Result("convert", "convert .bin to safetensors", f"to {dtype}",
                                {"file_gb": round(file_gb, 2), "dtype": dtype}, stats["time_s"], False,
                                _memory(stats, file_bytes)))

    for dtype in ("bfloat16", "float32"):
        group = f"load in {dtype}, {file_gb:.1f} GB .bin"
        variants = [
            ("off: torch.load + load_state_dict (.bin)", official, "plain", True),
            ("ours: meta + mmap + chunked cast (.bin)", official, "ours", False),
            (f"ours: safetensors {dtype} shards", converted[dtype], "ours", False),
        ]
        for variant, folder, method, is_baseline in variants:
            evict(folder)
            stats = in_fresh_process("load", str(folder), method, dtype)
            recorder.add(Result(
                "load", group, variant,
                {"dtype": dtype, "source": folder.name, "source_gb": round(weights_size(folder) / 1e9, 2),
                 "bin_gb": round(file_gb, 2), "page_cache": "evicted"},
                stats["time_s"], is_baseline, _memory(stats, file_bytes),
            ))


def _memory(stats: dict, file_bytes: int) -> dict:
    ratio = stats["peak_rss_mb"] * 2**20 / file_bytes
    return {"peak_rss_mb": round(stats["peak_rss_mb"]), "import_rss_mb": round(stats["import_rss_mb"]),
            "peak_vs_bin_file": round(ratio, 3), "weights_check": stats["check"],
            "memory": f"peak {stats['peak_rss_mb'] / 1024:.2f} GiB = {ratio:.2f}x .bin"}


if __name__ == "__main__":
    worker(sys.argv[1:])
