"""The RadFM engine: load once, encode each image once, generate many answers.

Low-level API (tests and benchmarks)::

    eng = RadFMEngine.load(folder, device="cpu", dtype=torch.float32)  # or quantization="int8"
    eng.tokenize(text) -> list[int]
    eng.image_tag(k) -> str
    eng.logits(input_ids, vision_x) -> FloatTensor[1, L, vocab]
    eng.generate_ids(input_ids, vision_x, max_new_tokens=N) -> list[int]

``vision_x`` is ``[1, S, 3, H, W, D]`` as in the official code. The friendlier
``eng.stream(text, images, settings)`` takes a prompt text and a list of images
(:class:`~RadFMSlicer.imaging.ModelImage` from ``preprocess``, or raw tensors
``[3, H, W, D]``; they may differ in depth) and returns a cancellable, iterable
:class:`~RadFMSlicer.generation.Generation`.
"""

import logging
import os
from typing import Sequence

import numpy as np
import torch
import xxhash

from .checkpoint import CheckpointFiles, load_model, locate_checkpoint, resolve_device, resolve_dtype
from .errors import CheckpointError, ImageError, RadFMError, RequestError
from .generation import (
    CompiledDecoder, DynamicDecoder, Generation, GenerationResult, GenerationSettings, explain_out_of_memory,
)
from .image_cache import LRUCache
from .model import RadFMModel
from .model.radfm import FRAME_PATCH_SIZE, PATCH_SIZE
from .quantization import check_tier, choose_dtype
from .tokenizer import RadFMTokenizer

log = logging.getLogger(__name__)


def image_key(image: torch.Tensor) -> str:
    """Content hash of a raw image tensor: equal pixels, equal key, wherever they came from.

    It reads every pixel, so it is used only where nothing better is known (a tensor handed
    to the low-level API); an image made by ``preprocess`` carries the key of what made it.
    """
    array = np.ascontiguousarray(image.detach().to("cpu", torch.float32).numpy())
    digest = xxhash.xxh3_128(array.data)
    digest.update(str(tuple(array.shape)).encode())
    return digest.hexdigest()


def tensor_and_key(image) -> tuple[torch.Tensor, str | None]:
    """``(tensor, key)`` of an image: a :class:`~RadFMSlicer.imaging.ModelImage` brings its own
    key (its source's fingerprint and recipe); a raw tensor has none (``None``)."""
    if isinstance(image, torch.Tensor):
        return image, None
    if not hasattr(image, "tensor"):
        raise ImageError(f"an image for the model is a ModelImage (from preprocess) or a tensor [3, H, W, D], "
                         f"got {type(image).__name__} {image!r:.60}")
    return image.tensor, image.key


class RadFMEngine:
    def __init__(
        self,
        model: RadFMModel,
        tokenizer: RadFMTokenizer,
        files: CheckpointFiles | None = None,
        cache_size: int = 8,
        quantization: str | None = None,
        compile_decode: bool = False,
        llm=None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.files = files
        # Taken once, as the weights are read: provenance names what was loaded, whatever the folder holds later.
        self.checkpoint_fingerprint = files.fingerprint() if files else None
        self.cache = LRUCache(cache_size)  # image key -> image tokens
        self.attention_cache = LRUCache(cache_size)  # image key -> resampler attention (only when asked for)
        self.device = next(model.parameters()).device
        self.dtype = model.embedding_layer.fc.weight.dtype
        self.quantization = quantization
        self.compile_decode = compile_decode
        self._compiled_decoder: CompiledDecoder | None = None  # built on the first answer
        self.llm = llm  # a remote LLM (vllm_client.VLLMBackend) that continues the merged embeddings, or None

    @staticmethod
    def load_options(
        folder: "str | os.PathLike",
        device: "str | torch.device" = "cpu",
        dtype: "str | torch.dtype | None" = None,
        quantization: str | None = None,
    ) -> "tuple[CheckpointFiles, torch.device, torch.dtype, str | None]":
        """``(files, device, dtype, quantization tier)`` that :meth:`load` loads with; raises the first bad one
        (folder, device, tier, dtype, in that order) without reading a weight. The CLI calls it before reading a scan."""
        if not isinstance(folder, (str, os.PathLike)):
            raise RequestError(f"folder takes the checkpoint folder's path, got {type(folder).__name__} {folder!r:.60}")
        files = locate_checkpoint(folder)
        target_device = resolve_device(device)
        tier = check_tier(quantization)
        asked = None if dtype in (None, "auto") else resolve_dtype(dtype)
        return files, target_device, choose_dtype(asked, target_device, tier), tier

    @classmethod
    def load(
        cls,
        folder: "str | os.PathLike",
        device: "str | torch.device" = "cpu",
        dtype: "str | torch.dtype | None" = None,
        cache_size: int = 8,
        quantization: str | None = None,
        compile_decode: bool = False,
        vllm_url: str | None = None,
    ) -> "RadFMEngine":
        """Load a checkpoint folder (official ``pytorch_model.bin`` or converted safetensors).

        ``dtype`` unset ("auto"): float32 on CPU (the reference maths), bfloat16 on CUDA or
        with ``quantization`` ("int8", "int4", "nf4": the LLM's linear layers, see
        :mod:`RadFMSlicer.quantization`). ``compile_decode``: static KV cache and a compiled
        decode step (see :class:`~RadFMSlicer.generation.CompiledDecoder`; for GPUs).
        ``vllm_url``: answers are generated by that vLLM server (see :mod:`RadFMSlicer.vllm_client`).
        """
        files, target_device, target_dtype, tier = cls.load_options(folder, device, dtype, quantization)
        tokenizer = RadFMTokenizer(files.tokenizer_model)
        llm = None
        if vllm_url:  # reached first: an unreachable vLLM is reported before minutes of loading
            from .vllm_client import VLLMBackend

            llm = VLLMBackend(vllm_url)
        with explain_out_of_memory(f"loading {files.folder}"):
            model = load_model(files, target_device, target_dtype, tier, embeddings_only=llm is not None)
        if tokenizer.vocab_size != model.dims.vocab_size:
            raise CheckpointError(
                f"{files.tokenizer_model} has {tokenizer.vocab_size} pieces but the model's vocabulary has "
                f"{model.dims.vocab_size}: wrong tokenizer folder (use Language_files/ from the RadFM release)"
            )
        tokenizer.tokens_per_image = model.dims.num_latents
        log.info("loaded %s (%s layout) on %s as %s%s", files.folder, files.layout, target_device, target_dtype,
                 f", LLM linears {tier}" if tier else "")
        return cls(model, tokenizer, files, cache_size, tier, compile_decode, llm)

    # --- text ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def image_tag(self, k: int) -> str:
        return self.tokenizer.image_tag(k)

    # --- images -------------------------------------------------------------------------
    def check_image(self, image: torch.Tensor, values: bool = True) -> None:
        """Raise ImageError unless ``image [3, H, W, D]`` is something the model can see.

        ``values=False`` checks the shape only (constant time): for a tensor whose values
        were checked when it was made (``preprocess`` output).
        """
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
        if not image.is_floating_point() or (values and not bool(torch.isfinite(image).all())):
            raise ImageError("image values must be finite floats (RadFM expects [0, 1])")

    def encode_images(self, images: Sequence) -> torch.Tensor:
        """Image tokens ``[len(images) * latents, llm_dim]``, each image encoded once and cached.

        An image is a :class:`~RadFMSlicer.imaging.ModelImage` (cached under its key, the
        fingerprint of its source and recipe: a follow-up on it costs no work that grows with
        the volume) or a raw tensor ``[3, H, W, D]`` (cached under a hash of its pixels,
        its values checked the first time).
        """
        tokens = []
        for image in images:
            tensor, key = tensor_and_key(image)
            self.check_image(tensor, values=False)
            key = key or image_key(tensor)
            cached = self.cache.get(key)
            if cached is None:
                if image is tensor:  # raw: nobody checked its values yet
                    self.check_image(tensor)
                with torch.inference_mode(), explain_out_of_memory(f"encoding a {tensor.shape[-1]}-slice image"):
                    cached = self.model.encode_images(self._batch(tensor))[0].to(self.dtype)
                self.cache.put(key, cached)
            tokens.append(cached)
        if not tokens:
            return torch.empty(0, self.model.dims.llm_dim, device=self.device, dtype=self.dtype)
        return torch.cat(tokens)

    def _batch(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[1, 3, H, W, D]`` on the model's device and dtype; a gray image shared by its 3 channels
        (preprocess's view) stays shared, so one channel moves and the encoder embeds it once."""
        source = tensor[:1] if tensor.stride(0) == 0 else tensor
        return source.to(self.device, self.dtype).expand_as(tensor).unsqueeze(0)

    def image_attention(self, image) -> torch.Tensor:
        """The resampler's attention on ``image``'s patch grid, float32 ``[layers, H/32, W/32, D/4]``.

        Computed in the same pass as the image's tokens, which are cached with it: asking
        about the image afterwards encodes nothing. Resampler attention, not an explanation
        (see :mod:`RadFMSlicer.attention`).
        """
        tensor, key = tensor_and_key(image)
        self.check_image(tensor, values=key is None)
        key = key or image_key(tensor)
        attention = self.attention_cache.get(key)
        if attention is None:
            with torch.inference_mode(), explain_out_of_memory(f"encoding a {tensor.shape[-1]}-slice image"):
                tokens, maps = self.model.encode_images(self._batch(tensor), return_attention=True)
            self.cache.put(key, tokens[0].to(self.dtype))
            attention = maps[:, 0].float().cpu()
            self.attention_cache.put(key, attention)
        return attention

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
        if self.llm is not None:
            raise RadFMError("this engine generates on a vLLM server and holds no LLM layers: load it without vllm_url")
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
        if self.llm is not None:
            return self.llm.start(input_ids, embeds, settings, max_positions)
        if self.compile_decode:
            if self._compiled_decoder is None:
                self._compiled_decoder = CompiledDecoder(lm, max_positions)
            decoder = self._compiled_decoder
        else:
            decoder = DynamicDecoder(lm)
        return Generation(decoder, self.tokenizer, input_ids.to(self.device), embeds, settings, max_positions)

    def stream(self, text: str, images: Sequence[torch.Tensor], settings: GenerationSettings | None = None) -> Generation:
        """Tokenize a prompt (with image tags for ``images``) and return its generation."""
        if settings is not None and not isinstance(settings, GenerationSettings):
            raise RequestError(f"settings takes a GenerationSettings, got {type(settings).__name__}")
        if isinstance(images, (str, os.PathLike, dict)):
            raise RequestError(f"images takes a list of ModelImage or tensors [3, H, W, D], got {type(images).__name__}")
        ids = torch.tensor([self.tokenize(text)], dtype=torch.long)
        return self.start(ids, images, settings or GenerationSettings())

    def answer(self, text: str, images: Sequence[torch.Tensor], settings: GenerationSettings | None = None,
               on_text=None) -> GenerationResult:
        return self.stream(text, images, settings).run(on_text)

    def describe(self) -> dict:
        """What produced an answer, for provenance."""
        return {
            "checkpoint": str(self.files.folder) if self.files else None,
            "checkpoint_fingerprint": self.checkpoint_fingerprint,
            "layout": self.files.layout if self.files else None,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "quantization": self.quantization,
            "compile_decode": self.compile_decode,
            **(self.llm.describe() if self.llm is not None else {}),
        }
