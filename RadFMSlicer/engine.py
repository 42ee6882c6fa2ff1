"""The RadFM engine: load once, encode each image once, generate many answers.

Low-level API (tests and benchmarks)::

    eng = RadFMEngine.load(folder, device="cpu", dtype=torch.float32)  # or quantization="int8"
    eng.tokenize(text) -> list[int]
    eng.image_tag(k) -> str
    eng.logits(input_ids, vision_x) -> FloatTensor[1, L, vocab]
    eng.generate_ids(input_ids, vision_x, max_new_tokens=N) -> list[int]

``vision_x`` is ``[1, S, 3, H, W, D]`` as in the official code. The friendlier
``eng.stream(text, images, settings)`` takes a prompt text and a list of per-image
tensors ``[3, H, W, D]`` (which may differ in depth) and returns a cancellable,
iterable :class:`~RadFMSlicer.generation.Generation`.
"""

import hashlib
import logging
import os
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from .checkpoint import CheckpointFiles, load_model, locate_checkpoint, resolve_device, resolve_dtype
from .errors import CheckpointError, ImageError
from .generation import (
    CompiledDecoder, DynamicDecoder, Generation, GenerationResult, GenerationSettings, explain_out_of_memory,
)
from .model import RadFMModel
from .model.radfm import FRAME_PATCH_SIZE, PATCH_SIZE
from .quantization import check_tier, choose_dtype
from .tokenizer import RadFMTokenizer

log = logging.getLogger(__name__)


def image_key(image: torch.Tensor) -> str:
    """Content hash of an image tensor: equal pixels, equal key, wherever they came from."""
    array = np.ascontiguousarray(image.detach().to("cpu", torch.float32).numpy())
    digest = hashlib.blake2b(array.data, digest_size=16)
    digest.update(str(tuple(array.shape)).encode())
    return digest.hexdigest()


class EncodingCache:
    """The image tokens of the most recently used images (least recently used evicted first)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        tokens = self._entries.get(key)
        if tokens is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return tokens

    def put(self, key: str, tokens: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self._entries[key] = tokens
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class RadFMEngine:
    def __init__(
        self,
        model: RadFMModel,
        tokenizer: RadFMTokenizer,
        files: CheckpointFiles | None = None,
        cache_size: int = 8,
        quantization: str | None = None,
        compile_decode: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.files = files
        self.cache = EncodingCache(cache_size)
        self.device = next(model.parameters()).device
        self.dtype = model.embedding_layer.fc.weight.dtype
        self.quantization = quantization
        self.compile_decode = compile_decode
        self._compiled_decoder: CompiledDecoder | None = None  # built on the first answer

    @classmethod
    def load(
        cls,
        folder: "str | os.PathLike",
        device: "str | torch.device" = "cpu",
        dtype: "str | torch.dtype | None" = None,
        cache_size: int = 8,
        quantization: str | None = None,
        compile_decode: bool = False,
    ) -> "RadFMEngine":
        """Load a checkpoint folder (official ``pytorch_model.bin`` or converted safetensors).

        ``dtype`` unset ("auto"): float32 on CPU (the reference maths), bfloat16 on CUDA or
        with ``quantization`` ("int8", "int4", "nf4": the LLM's linear layers, see
        :mod:`RadFMSlicer.quantization`). ``compile_decode``: static KV cache and a compiled
        decode step (see :class:`~RadFMSlicer.generation.CompiledDecoder`; for GPUs).
        """
        files = locate_checkpoint(folder)
        target_device = resolve_device(device)
        tier = check_tier(quantization)
        asked = None if dtype in (None, "auto") else resolve_dtype(dtype)
        target_dtype = choose_dtype(asked, target_device, tier)
        tokenizer = RadFMTokenizer(files.tokenizer_model)
        with explain_out_of_memory(f"loading {files.folder}"):
            model = load_model(files, target_device, target_dtype, tier)
        if tokenizer.vocab_size != model.dims.vocab_size:
            raise CheckpointError(
                f"{files.tokenizer_model} has {tokenizer.vocab_size} pieces but the model's vocabulary has "
                f"{model.dims.vocab_size}: wrong tokenizer folder (use Language_files/ from the RadFM release)"
            )
        tokenizer.tokens_per_image = model.dims.num_latents
        log.info("loaded %s (%s layout) on %s as %s%s", files.folder, files.layout, target_device, target_dtype,
                 f", LLM linears {tier}" if tier else "")
        return cls(model, tokenizer, files, cache_size, tier, compile_decode)

    # --- text ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def image_tag(self, k: int) -> str:
        return self.tokenizer.image_tag(k)

    # --- images -------------------------------------------------------------------------
    def check_image(self, image: torch.Tensor) -> None:
        """Raise ImageError unless ``image [3, H, W, D]`` is something the model can see."""
        dims = self.model.dims
        if image.ndim != 4 or image.shape[0] != 3:
            raise ImageError(f"an image must be [3, H, W, D], got {list(image.shape)}")
        _, h, w, d = image.shape
        if h % PATCH_SIZE or w % PATCH_SIZE or not 0 < h <= dims.max_height or not 0 < w <= dims.max_width:
            raise ImageError(
                f"image size {h}x{w}: height and width must be multiples of {PATCH_SIZE}, "
                f"at most {dims.max_height}x{dims.max_width}"
            )
        if d % FRAME_PATCH_SIZE or not 0 < d <= dims.max_depth:
            raise ImageError(f"image depth {d}: must be a multiple of {FRAME_PATCH_SIZE}, at most {dims.max_depth}")
        if not image.is_floating_point() or not bool(torch.isfinite(image).all()):
            raise ImageError("image values must be finite floats (RadFM expects [0, 1])")

    def encode_images(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Image tokens ``[len(images) * latents, llm_dim]``, each image encoded once and cached."""
        tokens = []
        for image in images:
            self.check_image(image)
            key = image_key(image)
            cached = self.cache.get(key)
            if cached is None:
                with torch.inference_mode(), explain_out_of_memory(f"encoding a {image.shape[-1]}-slice image"):
                    batch = image.unsqueeze(0).to(self.device, self.dtype)
                    cached = self.model.encode_images(batch)[0].to(self.dtype)
                self.cache.put(key, cached)
            tokens.append(cached)
        if not tokens:
            return torch.empty(0, self.model.dims.llm_dim, device=self.device, dtype=self.dtype)
        return torch.cat(tokens)

    @staticmethod
    def split_vision_x(vision_x: torch.Tensor | None) -> list[torch.Tensor]:
        """The official ``[1, S, 3, H, W, D]`` batch as a list of S images."""
        if vision_x is None:
            return []
        if vision_x.ndim != 6 or vision_x.shape[0] != 1:
            raise ImageError(f"vision_x must be [1, S, 3, H, W, D], got {list(vision_x.shape)}")
        return list(vision_x[0])

    def embed(self, input_ids: torch.Tensor, images: Sequence[torch.Tensor]) -> torch.Tensor:
        image_tokens = self.encode_images(images)
        return self.model.embed(input_ids.to(self.device), image_tokens)

    # --- low-level API ------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor, vision_x: torch.Tensor | None) -> torch.Tensor:
        """LLM logits for every position of ``input_ids [1, L]``, as float32 ``[1, L, vocab]``."""
        embeds = self.embed(input_ids, self.split_vision_x(vision_x))
        with torch.inference_mode(), explain_out_of_memory("computing logits"):
            return self.model.lang_model(inputs_embeds=embeds).logits.float()

    def generate_ids(self, input_ids: torch.Tensor, vision_x: torch.Tensor | None, max_new_tokens: int = 256) -> list[int]:
        """Greedy new tokens, including EOS (2) if the model produced it."""
        generation = self.start(input_ids, self.split_vision_x(vision_x), GenerationSettings(max_new_tokens))
        return list(generation.token_ids())

    # --- streaming API ------------------------------------------------------------------
    def start(
        self, input_ids: torch.Tensor, images: Sequence[torch.Tensor], settings: GenerationSettings
    ) -> Generation:
        """A generation ready to run: images encoded (or taken from the cache), prompt embedded."""
        if input_ids.ndim == 1:
            input_ids = input_ids.unsqueeze(0)
        embeds = self.embed(input_ids, images)
        lm = self.model.lang_model
        max_positions = lm.config.max_position_embeddings
        if self.compile_decode:
            if self._compiled_decoder is None:
                self._compiled_decoder = CompiledDecoder(lm, max_positions)
            decoder = self._compiled_decoder
        else:
            decoder = DynamicDecoder(lm)
        return Generation(decoder, self.tokenizer, input_ids.to(self.device), embeds, settings, max_positions)

    def stream(self, text: str, images: Sequence[torch.Tensor], settings: GenerationSettings | None = None) -> Generation:
        """Tokenize a prompt (with image tags for ``images``) and return its generation."""
        ids = torch.tensor([self.tokenize(text)], dtype=torch.long)
        return self.start(ids, images, settings or GenerationSettings())

    def answer(self, text: str, images: Sequence[torch.Tensor], settings: GenerationSettings | None = None,
               on_text=None) -> GenerationResult:
        return self.stream(text, images, settings).run(on_text)

    def describe(self) -> dict:
        """What produced an answer, for provenance."""
        return {
            "checkpoint": str(self.files.folder) if self.files else None,
            "checkpoint_fingerprint": self.files.fingerprint() if self.files else None,
            "layout": self.files.layout if self.files else None,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "quantization": self.quantization,
            "compile_decode": self.compile_decode,
        }
