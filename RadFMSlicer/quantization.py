"""Precision tiers: what a RadFM model costs in memory, and weight-only quantization while loading.

RadFM's LLaMA-13B is 26 GB in bfloat16: too much for a 24 GB card. Weight-only int8
halves the LLM's linear layers and int4 / NF4 quarter them; activations stay 16-bit.

* Quantized: the q/k/v/o and gate/up/down projections of every decoder layer (97% of
  the parameters of the real model).
* Kept in 16-bit: ``lm_head`` (1.2% of the parameters, and the layer whose error goes
  straight into the token choice; bitsandbytes, GPTQ and AWQ keep it too), the text
  embedding (a lookup, nothing to speed up), the norms, and the whole vision side
  (ViT, perceiver, projection: run once per image, 1% of the bytes).

Backends: int8 is torchao's per-row ``Int8WeightOnlyConfig`` (CPU and CUDA). int4 is
torchao's group-wise (128) tinygemm format: ``Int4WeightOnlyConfig`` with the
``tile_packed_to_4d`` packing on CUDA (bfloat16, Ampere or newer), and on CPU the
``PrototypeInt4WeightOnlyConfig`` of torchao 0.18 (the stable config has no CPU packing
there; both run the same tinygemm maths). NF4 is bitsandbytes' ``Linear4bit`` (block 64,
double quantization) where bitsandbytes is installed.

Each linear layer is quantized as soon as its weight is loaded (see
``checkpoint.assign_weights``), so a full 16-bit copy of the LLM never exists.
"""

import logging

import torch
from torch import nn

from .errors import CheckpointError, DeviceMemoryError
from .model import RadFMDims
from .model.radfm import RadFMEmbedding

log = logging.getLogger(__name__)

FLOAT_TIERS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZED_TIERS = ("int8", "int4", "nf4")
TIERS = (*FLOAT_TIERS, *QUANTIZED_TIERS)
# The 16-bit activation dtypes each quantized tier runs with (first = default).
QUANTIZED_DTYPES = {
    "int8": (torch.bfloat16, torch.float16),
    "int4": (torch.bfloat16,),  # tinygemm kernels take bfloat16 only
    "nf4": (torch.bfloat16, torch.float16),
}
QUANTIZED_PREFIX = "lang_model.model.layers."
INT4_GROUP_SIZES = (128, 64, 32)
NF4_BLOCK = 64
DEFAULT_CONTEXT = 2048  # RadFM's max_position_embeddings
RUNTIME_MARGIN = 1 << 30  # CUDA context, allocator slack, activations (SDPA keeps them small)
GIB = 1 << 30


def check_tier(quantization: str | None) -> str | None:
    if quantization in (None, "", "none"):
        return None
    if quantization not in QUANTIZED_TIERS:
        raise CheckpointError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZED_TIERS)} or none")
    return quantization


def choose_dtype(dtype: "torch.dtype | None", device: torch.device, quantization: str | None) -> torch.dtype:
    """The dtype to load in. Unset: bfloat16 on CUDA or when quantizing, float32 on CPU (parity)."""
    if quantization is None:
        if dtype is not None:
            return dtype
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    allowed = QUANTIZED_DTYPES[quantization]
    if dtype is None:
        return allowed[0]
    if dtype not in allowed:
        names = " or ".join(str(d).replace("torch.", "") for d in allowed)
        raise CheckpointError(f"{quantization} runs with {names} activations, not {str(dtype).replace('torch.', '')}: "
                              f"leave the dtype unset or pick {names}")
    return dtype


def tier_dtype(tier: str) -> torch.dtype:
    """The dtype a tier loads everything but its quantized linears in (a quantized tier's default)."""
    return FLOAT_TIERS.get(tier) or QUANTIZED_DTYPES[tier][0]


def tier_name(dtype: torch.dtype, quantization: str | None) -> str:
    return quantization or next(name for name, d in FLOAT_TIERS.items() if d == dtype)


# --- memory estimates -----------------------------------------------------------------------
def int4_group_size(in_features: int) -> int:
    for size in INT4_GROUP_SIZES:
        if in_features % size == 0:
            return size
    raise CheckpointError(f"int4 needs linear widths divisible by 32; this model has {in_features}")


def linear_bytes(out_features: int, in_features: int, tier: str) -> int:
    """Bytes of one LLM linear weight in ``tier``, with the scales each format stores."""
    n = out_features * in_features
    if tier in FLOAT_TIERS:
        return n * FLOAT_TIERS[tier].itemsize
    if tier == "int8":  # int8 values; float32 scale and int8 zero point per row
        return n + 5 * out_features
    if tier == "int4":  # two values a byte; bfloat16 scale and zero per group
        return n // 2 + 4 * n // int4_group_size(in_features)
    # nf4: two values a byte; uint8 absmax per block, float32 per 256 blocks (double quantization)
    blocks = -(-n // NF4_BLOCK)
    return n // 2 + blocks + 4 * -(-blocks // 256) + 64


def _vision_parameters(dims: RadFMDims) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in RadFMEmbedding(dims).parameters())


def llm_linear_shapes(dims: RadFMDims) -> list[tuple[int, int]]:
    """(out, in) of every quantized linear layer (RadFM's LLaMA has no grouped KV heads)."""
    h, i = dims.llm_dim, dims.llm_intermediate
    return [(h, h)] * 4 * dims.llm_layers + [(i, h)] * 2 * dims.llm_layers + [(h, i)] * dims.llm_layers


def estimate_weight_bytes(dims: RadFMDims, tier: str) -> int:
    """Bytes of all weights in ``tier``: quantized LLM linears, the rest in the activation dtype."""
    if tier not in TIERS:
        raise CheckpointError(f"unknown precision tier {tier!r}; use one of {', '.join(TIERS)}")
    rest_dtype = tier_dtype(tier)
    linears = sum(linear_bytes(o, i, tier) for o, i in llm_linear_shapes(dims))
    h = dims.llm_dim
    rest = 2 * dims.vocab_size * h + (2 * dims.llm_layers + 1) * h + _vision_parameters(dims)
    return linears + rest * rest_dtype.itemsize


def estimate_memory(dims: RadFMDims, tier: str, context: int = DEFAULT_CONTEXT) -> int:
    """Device bytes to run ``tier``: weights, a KV cache for ``context`` tokens and a margin."""
    kv_itemsize = 4 if tier == "float32" else 2
    kv_cache = 2 * dims.llm_layers * context * dims.llm_dim * kv_itemsize
    return estimate_weight_bytes(dims, tier) + kv_cache + RUNTIME_MARGIN


def check_device_memory(dims: RadFMDims, device: torch.device, tier: str) -> None:
    """Before loading on CUDA: refuse a tier that cannot fit, naming the ones that do."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    need = estimate_memory(dims, tier)
    log.info("%s needs about %.1f GiB on %s (%.1f of %.1f GiB free)", tier, need / GIB, device, free / GIB, total / GIB)
    if need <= free:
        return
    fitting = [f"{t} (~{estimate_memory(dims, t) / GIB:.1f} GiB)" for t in TIERS if estimate_memory(dims, t) <= free]
    advice = (DeviceMemoryError.FITS + ", ".join(fitting) if fitting
              else "no tier fits: close other GPU programs or use --device cpu")
    raise DeviceMemoryError(
        f"{tier} needs about {need / GIB:.1f} GiB on {device} but only {free / GIB:.1f} GiB are free; {advice}"
    )


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of a plain, torchao or bitsandbytes tensor (scales included)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(t) for t in (getattr(tensor, n) for n in names) if t is not None)
    state = getattr(tensor, "quant_state", None)
    extra = sum(tensor_bytes(t) for t in state.as_dict(packed=True).values() if torch.is_tensor(t)) if state else 0
    return tensor.numel() * tensor.element_size() + extra


def weight_bytes(module: nn.Module) -> int:
    return sum(tensor_bytes(p) for p in module.parameters())


# --- quantizing while loading ---------------------------------------------------------------
def _torchao_config(tier: str, device: torch.device, in_features: int):
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError as exc:
        raise CheckpointError(f"{tier} needs torchao: pip install 'torchao>=0.18'") from exc
    if tier == "int8":
        return Int8WeightOnlyConfig()
    if device.type == "cuda":
        return Int4WeightOnlyConfig(group_size=int4_group_size(in_features), int4_packing_format="tile_packed_to_4d")
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=int4_group_size(in_features))


def _nf4_linear(linear: nn.Linear, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    out = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            compute_dtype=linear.weight.dtype, quant_type="nf4", device="meta")
    out.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCK)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return out.to(device)


class LinearQuantizer:
    """The ``finish`` hook of ``assign_weights``: quantizes each LLM linear once its weight is in."""

    def __init__(self, quantization: str, device: torch.device):
        if quantization == "nf4":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as exc:
                raise CheckpointError("nf4 needs bitsandbytes (pip install bitsandbytes); "
                                      "or use int8 / int4, which need torchao only") from exc
        else:
            _torchao_config(quantization, device, INT4_GROUP_SIZES[0])  # fail before loading if torchao is missing
        if quantization == "int4" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
            raise CheckpointError("int4 on CUDA needs an Ampere or newer GPU (bfloat16 tinygemm); use int8 or nf4")
        self.quantization = quantization
        self.device = device

    def __call__(self, model: nn.Module, name: str, module: nn.Module) -> None:
        if not (name.startswith(QUANTIZED_PREFIX) and type(module) is nn.Linear):
            return
        if self.quantization == "nf4":
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, _nf4_linear(module, self.device))
            return
        from torchao.quantization import quantize_

        quantize_(module, _torchao_config(self.quantization, self.device, module.in_features))
