"""``radfm convert``: the released fp32 ``pytorch_model.bin`` to sharded 16-bit safetensors.

Why: the release is one 56 GB pickle. The converted folder is half the size (bfloat16),
holds only what inference uses (training heads, the duplicate text embedding and rotary
tables dropped), loads without unpickling, and every file is listed with its sha256 in
``radfm_manifest.json`` so a copy can be checked. The layout is HuggingFace's
(``model.safetensors.index.json`` + ``model-0000k-of-0000n.safetensors``), which
``checkpoint.locate_checkpoint`` recognises. Memory: one shard plus one tensor.

The output is written whole or not at all: the free space is checked first (the shards of
the full model are ~28 GB), the files go to a hidden ``.<out>.partial`` folder beside
``out`` that is renamed to ``out`` at the end, and a failure (a full disk, Ctrl-C) removes it:
no half checkpoint is left to be loaded, and the same command run again completes.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import __version__, storage
from .checkpoint import (
    LANGUAGE_FILES, SAFETENSORS_INDEX, WeightSource, check_keys, is_inference_key, llama_config,
    locate_checkpoint, resolve_dtype,
)
from .errors import CheckpointError
from .model import RadFMDims, RadFMModel

MANIFEST = "radfm_manifest.json"
DEFAULT_SHARD_GB = 2.0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


def plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Keys grouped in file order into shards of at most ``shard_bytes`` (a larger tensor goes alone)."""
    shards, size = [[]], 0
    for key, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


SPACE_MARGIN = 1.02  # the index, manifest and tokenizer files, and the file system's own blocks


def _new_output_folder(out_folder, shard_size_gb: float) -> Path:
    out = Path(out_folder).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not empty: choose a new folder for the converted checkpoint")
    if shard_size_gb <= 0:
        raise CheckpointError(f"shard size must be positive, got {shard_size_gb} GB")
    return out


def _check_room(out: Path, shapes: dict, itemsize: int, files) -> None:
    """Refuse now (no room, or no writing there), naming what is needed and what is free, rather than after
    writing gigabytes."""
    weights = sum(itemsize * int(torch.Size(shape).numel()) for shape in shapes.values())
    extra = sum(p.stat().st_size for p in (files.folder / LANGUAGE_FILES).rglob("*") if p.is_file())
    needed = int((weights + extra) * SPACE_MARGIN)
    folder = next(p for p in (out, *out.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=folder):  # a read-only disk or a folder not ours: said as such
            pass
    except OSError as exc:
        raise CheckpointError(f"cannot write the converted checkpoint in {folder}: {exc.strerror or exc}") from None
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CheckpointError(f"converting needs about {_size(needed)} in {folder}, which has {_size(free)} free: "
                              f"free space, or choose --out on another disk")


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


@contextlib.contextmanager
def _written_whole(out: Path):
    """Yield a hidden folder to write into, renamed to ``out`` at the end; on failure nothing is left.

    Held by :func:`storage.sole_writer`, so a partial folder left by a killed run is removed
    safely and two conversions into one folder cannot mix their shards.
    """
    from safetensors import SafetensorError

    partial = out.with_name(f".{out.name}.partial")
    with storage.sole_writer(out, "radfm convert"):
        shutil.rmtree(partial, ignore_errors=True)  # a killed run's leftovers
        try:
            partial.mkdir(parents=True)
            yield partial
            if out.exists():
                out.rmdir()  # empty (checked first): the finished folder takes its place
            os.replace(partial, out)
        except BaseException as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if isinstance(exc, (OSError, SafetensorError)):
                raise CheckpointError(f"could not write the converted checkpoint {out} ({_reason(exc)}); nothing "
                                      f"was left there: free space and run the same command again") from None
            raise


def _reason(exc: BaseException) -> str:
    """The system's words ("No space left on device"), also from inside safetensors' Rust error text."""
    text = getattr(exc, "strerror", None) or str(exc)
    found = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", text)
    return found.group(1) if found else text


def write_shards(source: WeightSource, names: dict[str, str], store_dtype: torch.dtype, shards: list[list[str]],
                 out: Path, progress=None) -> None:
    """Write ``shards`` (lists of output names; ``names`` maps each to its source key) and their index."""
    from safetensors.torch import save_file

    weight_map, total = {}, 0
    for index, keys in enumerate(shards, 1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: source.load(names[k], torch.device("cpu"), store_dtype) for k in keys}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        (out / name).chmod(0o644)  # safetensors writes 0600; a model folder is often shared
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
        if progress:
            progress(f"wrote {name} ({(out / name).stat().st_size / 1e9:.2f} GB, {len(keys)} tensors)")
    (out / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def write_manifest(out: Path, files, store_dtype: torch.dtype, layout: str, dropped: list[str]) -> None:
    """``radfm_manifest.json``: every file written with its sha256, and where it came from."""
    written = sorted(p for p in out.rglob("*") if p.is_file())
    manifest = {
        "format": layout,
        "dtype": str(store_dtype).replace("torch.", ""),
        "created_by": f"RadFMSlicer {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"folder": str(files.folder.resolve()), "layout": files.layout, "fingerprint": files.fingerprint()},
        "dropped_keys": dropped,
        "files": {p.relative_to(out).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in written},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _checked_source(files) -> tuple[WeightSource, RadFMDims]:
    """The weights, after checking every key and shape (fail before writing gigabytes)."""
    source = WeightSource(files)
    dims = RadFMDims.from_shapes(source.shapes)
    with torch.device("meta"):
        check_keys(RadFMModel(dims, llama_config(files, dims)), source.shapes)
    return source, dims


def convert_checkpoint(src_folder, out_folder, dtype="bfloat16", shard_size_gb: float = DEFAULT_SHARD_GB,
                       progress=None) -> Path:
    """Write the inference weights of ``src_folder`` to ``out_folder`` as sharded safetensors.

    ``out_folder`` must be new or empty. ``progress(message)`` is called once per shard.
    """
    files = locate_checkpoint(src_folder)
    store_dtype = resolve_dtype(dtype)
    out = _new_output_folder(out_folder, shard_size_gb)

    source, _ = _checked_source(files)
    keep = {k: s for k, s in source.shapes.items() if is_inference_key(k)}
    shards = plan_shards(keep, store_dtype.itemsize, int(shard_size_gb * 1e9))
    _check_room(out, keep, store_dtype.itemsize, files)

    with _written_whole(out) as folder:
        write_shards(source, {k: k for k in keep}, store_dtype, shards, folder, progress)
        for path in sorted((files.folder / LANGUAGE_FILES).rglob("*")):  # contents only: the release may be read-only
            if path.is_file():
                copy = folder / path.relative_to(files.folder)
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, copy)
        write_manifest(folder, files, store_dtype, "radfm-safetensors", sorted(set(source.shapes) - set(keep)))
    return out


# The language half as vLLM (or any Hugging Face loader) expects a Llama folder. The
# released tokenizer_config.json names no special tokens; these are the ones RadFM used.
LLAMA_PREFIX = "lang_model."
VLLM_CONTEXT = 2048  # RadFM's LLaMA was trained with 2048 positions
LLAMA_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": True,
    "model_max_length": VLLM_CONTEXT, "clean_up_tokenization_spaces": False,
}


def convert_for_vllm(src_folder, out_folder, dtype="bfloat16", shard_size_gb: float = DEFAULT_SHARD_GB,
                     progress=None) -> Path:
    """Write the LLaMA part of ``src_folder`` as a standard Hugging Face Llama folder.

    Why: vLLM serves a plain ``LlamaForCausalLM`` folder; fed RadFM's merged prompt
    embeddings (``prompt_embeds``) it continues exactly as our own decoder does. The config
    stops at EOS 2 (what every training answer ended with, not the released eos=1) and
    holds 2048 positions; the vision half stays with ``radfm serve``.
    """
    from transformers import GenerationConfig

    files = locate_checkpoint(src_folder)
    store_dtype = resolve_dtype(dtype)
    out = _new_output_folder(out_folder, shard_size_gb)
    source, dims = _checked_source(files)
    names = {k[len(LLAMA_PREFIX):]: k for k in source.shapes if k.startswith(LLAMA_PREFIX) and is_inference_key(k)}
    llama_shapes = {k: source.shapes[v] for k, v in names.items()}
    shards = plan_shards(llama_shapes, store_dtype.itemsize, int(shard_size_gb * 1e9))
    _check_room(out, llama_shapes, store_dtype.itemsize, files)

    with _written_whole(out) as folder:
        write_shards(source, names, store_dtype, shards, folder, progress)
        config = llama_config(files, dims)
        config.max_position_embeddings = VLLM_CONTEXT
        config.architectures = ["LlamaForCausalLM"]
        config.dtype = store_dtype
        config.save_pretrained(folder)
        raw = json.loads((folder / "config.json").read_text())
        raw["torch_dtype"] = raw.get("dtype", str(store_dtype).replace("torch.", ""))  # older loaders read this key
        (folder / "config.json").write_text(json.dumps(raw, indent=2))
        GenerationConfig(bos_token_id=1, eos_token_id=2, max_length=VLLM_CONTEXT).save_pretrained(folder)
        shutil.copyfile(files.tokenizer_model, folder / "tokenizer.model")
        (folder / "tokenizer_config.json").write_text(json.dumps(LLAMA_TOKENIZER_CONFIG, indent=2))
        (folder / "special_tokens_map.json").write_text(json.dumps(
            {k: LLAMA_TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "unk_token")}, indent=2))
        write_manifest(folder, files, store_dtype, "radfm-vllm-llama", sorted(set(source.shapes) - set(names.values())))
    return out
