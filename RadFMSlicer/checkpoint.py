"""Find, validate and load a RadFM checkpoint folder without wasting memory.

Two layouts are accepted:

* the official release: ``pytorch_model.bin`` (the whole multimodal state dict, fp32)
  plus ``Language_files/`` (LLaMA ``config.json``, ``tokenizer.model``);
* the converted layout written by ``radfm convert``: ``model.safetensors.index.json``,
  safetensors shards and ``Language_files/``.

Loading builds the modules on the meta device, opens the weights memory-mapped, and
casts/moves each tensor to the target device and dtype in chunks of ``COPY_CHUNK``
bytes, handing each chunk's file pages back to the OS right after it is copied: peak
memory is the loaded model plus one chunk, never two copies of the checkpoint (nor
even one extra copy of the 650 MB embedding). With a quantization tier each linear
layer is quantized as soon as it is loaded, so the 16-bit LLM never exists whole.
"""

import ctypes
import hashlib
import json
import mmap
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig

from .errors import CheckpointError
from .model import RadFMDims, RadFMModel
from .quantization import LinearQuantizer, check_device_memory, tier_name

OFFICIAL_WEIGHTS = "pytorch_model.bin"
SAFETENSORS_INDEX = "model.safetensors.index.json"
LANGUAGE_FILES = "Language_files"

# Keys of the released state dict that only training used.
TRAINING_ONLY_PREFIXES = (
    "embedding_layer.bert_model.",
    "embedding_layer.bert_projection_fc.",
    "embedding_layer.transformer_decoder",  # also transformer_decoder_mlp
    "embedding_layer.output_upscaling.",
    "embedding_layer.cls_head.",
)
# The official model shares this tensor with lang_model.model.embed_tokens.weight.
TEXT_EMBEDDING_ALIAS = "embedding_layer.weight"
COPY_CHUNK = 64 << 20  # bytes copied (and released) at a time while loading

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def is_inference_key(key: str) -> bool:
    """False for keys the model does not use at inference (training heads, rotary tables)."""
    return not (
        key.startswith(TRAINING_ONLY_PREFIXES)
        or key.endswith("rotary_emb.inv_freq")
        or key == TEXT_EMBEDDING_ALIAS
    )


def resolve_dtype(dtype: "str | torch.dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise CheckpointError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
    if str(dtype).lower() not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return DTYPES[str(dtype).lower()]


def resolve_device(device: "str | torch.device") -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(
                f"device {device!r} asked for, but PyTorch sees no CUDA GPU "
                f"(CPU-only PyTorch build or no driver); use --device cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise CheckpointError(f"device {device!r} does not exist: this machine has {count} GPU(s)")
    elif dev.type != "cpu":
        raise CheckpointError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return dev


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of a validated checkpoint folder."""

    folder: Path
    layout: str  # "official" or "safetensors"
    weights: Path  # pytorch_model.bin, or the safetensors index
    config: Path
    tokenizer_model: Path

    def fingerprint(self) -> str:
        """A cheap identity of the weights for provenance: sizes, head and tail bytes, config.

        Hashing 50 GB would take minutes; this changes whenever the files do in practice.
        """
        digest = hashlib.sha256()
        for path in [self.weights, *self._shards(), self.config, self.tokenizer_model]:
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with open(path, "rb") as f:
                digest.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                digest.update(f.read(1 << 20))
        return digest.hexdigest()[:16]

    def _shards(self) -> list[Path]:
        if self.layout != "safetensors":
            return []
        weight_map = read_json(self.weights, "safetensors index")["weight_map"]
        return [self.folder / name for name in sorted(set(weight_map.values()))]


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the {what} {path}: {exc}") from exc


def locate_checkpoint(folder: "str | os.PathLike") -> CheckpointFiles:
    """Check that ``folder`` has a RadFM layout; raise a CheckpointError saying what is missing."""
    root = Path(folder).expanduser()
    if root.is_file():
        raise CheckpointError(
            f"the checkpoint {root} is a file: give the folder that holds it ({root.parent}, with "
            f"{OFFICIAL_WEIGHTS} and {LANGUAGE_FILES}/)"
        )
    if not root.is_dir():
        raise CheckpointError(
            f"checkpoint folder not found: {root} (expected a folder with {OFFICIAL_WEIGHTS} "
            f"and {LANGUAGE_FILES}/)"
        )
    if (root / SAFETENSORS_INDEX).is_file():
        layout, weights = "safetensors", root / SAFETENSORS_INDEX
    elif (root / OFFICIAL_WEIGHTS).is_file():
        layout, weights = "official", root / OFFICIAL_WEIGHTS
    else:
        raise CheckpointError(
            f"{root} has no {OFFICIAL_WEIGHTS} (the RadFM release file) and no {SAFETENSORS_INDEX} "
            f"(written by 'radfm convert'); point --checkpoint at the folder that holds it"
        )
    lang = root / LANGUAGE_FILES
    if not lang.is_dir():
        raise CheckpointError(
            f"{root} has no {LANGUAGE_FILES}/ folder (LLaMA config.json and tokenizer.model from the RadFM release)"
        )
    config, tokenizer_model = lang / "config.json", lang / "tokenizer.model"
    if not tokenizer_model.is_file():
        raise CheckpointError(
            f"{lang} has no tokenizer.model: this is not the RadFM tokenizer folder "
            f"(copy Language_files/ from the RadFM release)"
        )
    if not config.is_file():
        raise CheckpointError(f"{lang} has no config.json (the LLaMA configuration from the RadFM release)")
    return CheckpointFiles(root, layout, weights, config, tokenizer_model)


def _release_pages(tensor: torch.Tensor) -> None:
    """Give a memory-mapped tensor's pages back to the OS (they are re-read if touched again)."""
    if tensor.device.type != "cpu" or not hasattr(_libc, "madvise"):
        return
    page = mmap.PAGESIZE
    start = tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()
    end = start + tensor.numel() * tensor.element_size()
    aligned = start - start % page
    length = end - aligned
    if length > 0:
        _libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(length), 4)  # MADV_DONTNEED


try:
    _libc = ctypes.CDLL(None)
except OSError:  # pragma: no cover - non-POSIX
    _libc = None


class WeightSource:
    """Lazy access to a checkpoint's tensors: ``shapes`` up front, one ``tensor`` at a time."""

    def __init__(self, files: CheckpointFiles):
        self.files = files
        if files.layout == "official":
            self._tensors = _open_torch_file(files.weights)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        else:
            self._key_to_shard = read_json(files.weights, "safetensors index")["weight_map"]
            self._shards = {}
            self.shapes = {}
            for shard in sorted(set(self._key_to_shard.values())):
                handle = self._open_shard(shard)
                for key in handle.keys():
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def _open_shard(self, name: str):
        from safetensors import safe_open

        if name not in self._shards:
            path = self.files.folder / name
            if not path.is_file():
                raise CheckpointError(f"safetensors shard {path} named in {SAFETENSORS_INDEX} is missing")
            try:
                self._shards[name] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{path} is not a readable safetensors file (truncated?): {exc}") from exc
        return self._shards[name]

    def load(self, key: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The tensor ``key`` as a fresh copy on ``device`` in ``dtype`` (floats only are cast).

        Both layouts give a view of the memory-mapped file; it is copied straight to the
        device chunk by chunk, each chunk's pages released once copied.
        """
        if self.files.layout == "official":
            source = self._tensors[key]
        else:
            source = self._open_shard(self._key_to_shard[key]).get_tensor(key)
        target_dtype = dtype if source.is_floating_point() else source.dtype
        out = torch.empty(source.shape, dtype=target_dtype, device=device)
        if not source.is_contiguous():
            out.copy_(source)
            _release_pages(source)
            return out
        flat_source, flat_out = source.reshape(-1), out.reshape(-1)
        step = max(1, COPY_CHUNK // source.element_size())
        for start in range(0, flat_source.numel(), step):
            chunk = flat_source[start:start + step]
            flat_out[start:start + step].copy_(chunk)
            _release_pages(chunk)
        return out


def _open_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        size = path.stat().st_size
        shown = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"  # a cut download: often tiny
        raise CheckpointError(
            f"{path} ({shown}) is not a readable PyTorch checkpoint — truncated download "
            f"or a different file? ({_short_cause(exc)})"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors: not a RadFM checkpoint")
    return state


def _short_cause(exc: Exception, limit: int = 100) -> str:
    """PyTorch's reason in brief: its first sentence (its miniz error adds a paragraph of advice), clipped."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def llama_config(files: CheckpointFiles, dims: RadFMDims) -> LlamaConfig:
    return build_llama_config(read_json(files.config, "LLaMA config"), dims, files.config)


def build_llama_config(raw: dict, dims: RadFMDims, source: "Path | str") -> LlamaConfig:
    """A LlamaConfig from the ``config.json`` contents ``raw``, checked against the weights.

    The released config says bos=0, eos=1; RadFM was trained with BOS 1 and answers end
    with EOS 2, so those are set here (generation stops at 2).
    """
    raw = dict(raw)
    expected = {
        "hidden_size": dims.llm_dim,
        "vocab_size": dims.vocab_size,
        "num_hidden_layers": dims.llm_layers,
        "intermediate_size": dims.llm_intermediate,
    }
    for field, value in expected.items():
        if raw.get(field) != value:
            raise CheckpointError(
                f"{source} says {field}={raw.get(field)} but the weights have {value}: "
                f"config.json and the weight file come from different models"
            )
    heads = raw.get("num_attention_heads")
    if not isinstance(heads, int) or heads <= 0 or dims.llm_dim % heads:
        raise CheckpointError(f"{source}: num_attention_heads must divide hidden_size {dims.llm_dim}")
    raw.update(bos_token_id=1, eos_token_id=2, pad_token_id=None, torch_dtype=None)
    raw.pop("dtype", None)
    config = LlamaConfig(**raw)
    config._attn_implementation = "sdpa"
    return config


def check_keys(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every model tensor present with the right shape; nothing unknown left over."""
    wanted = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for key, shape in shapes.items():
        if not is_inference_key(key):
            continue
        if key not in wanted:
            raise CheckpointError(f"unexpected key {key!r} in the checkpoint: not part of RadFM")
        if shape != wanted[key]:
            raise CheckpointError(f"{key!r} has shape {list(shape)}, expected {list(wanted[key])}")
    missing = [name for name in wanted if name not in shapes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"the checkpoint is missing {missing[0]!r}{more}: truncated or not RadFM")


def materialise_buffers(model: RadFMModel, device: torch.device) -> None:
    """Rebuild the modules whose buffers are computed, not stored (rotary tables)."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not type(module).__name__.endswith("RotaryEmbedding"):
                raise CheckpointError(f"internal: buffer of {name} was not loaded")
            parent_name, _, leaf = name.rpartition(".")
            with torch.device("cpu"):
                fresh = type(module)(model.lang_model.config)
            setattr(model.get_submodule(parent_name), leaf, fresh.to(device))


def assign_weights(model: nn.Module, source: WeightSource, device: torch.device, dtype: torch.dtype,
                   finish=None) -> None:
    """Replace each meta parameter by its loaded tensor, one at a time.

    ``finish(model, name, module)`` runs as soon as a module's own parameters are in
    (quantization works there, one layer at a time).
    """
    for module_name, module in list(model.named_modules()):
        for leaf, _ in list(module.named_parameters(recurse=False)):
            key = f"{module_name}.{leaf}" if module_name else leaf
            module.register_parameter(leaf, nn.Parameter(source.load(key, device, dtype), requires_grad=False))
        if finish is not None:
            finish(model, module_name, module)


def drop_decoder(model: RadFMModel) -> None:
    """Keep what makes the prompt embeddings (vision half, text embedding); the decoder runs elsewhere.

    With ``--llm-backend vllm`` the LLaMA layers live in vLLM: loading them here too would
    hold the 13B weights twice. What is left cannot compute logits (no layers, no head).
    """
    lm = model.lang_model
    lm.model.layers = nn.ModuleList()
    lm.model.norm = None
    lm.lm_head = None


def load_model(files: CheckpointFiles, device: torch.device, dtype: torch.dtype,
               quantization: str | None = None, embeddings_only: bool = False) -> RadFMModel:
    """The model on ``device``; ``quantization`` (int8, int4, nf4) applies to the LLM's linear layers.

    ``embeddings_only``: without the LLM's layers (see :func:`drop_decoder`).
    """
    source = WeightSource(files)
    dims = RadFMDims.from_shapes(source.shapes)
    config = llama_config(files, dims)
    if not embeddings_only:  # the estimate is the whole model's
        check_device_memory(dims, device, tier_name(dtype, quantization))
    finish = LinearQuantizer(quantization, device) if quantization else None
    with torch.device("meta"):
        model = RadFMModel(dims, config)
    check_keys(model, source.shapes)
    if embeddings_only:
        drop_decoder(model)
    assign_weights(model, source, device, dtype, finish)
    materialise_buffers(model, device)
    return model.eval()
