"""Token-by-token generation with a KV cache: greedy or sampled, streamed, cancellable.

The loop is written out (rather than ``model.generate``) so that each token can be
streamed as text, a cancel from another thread stops it before the next forward pass,
and the stop reason is always known. Generation stops at EOS id 2, the token that ended
every training answer; the released ``config.json`` says eos=1, and following it makes
every answer run to the token limit.

torch and transformers are imported where the loop needs them, not with this module:
front ends read :class:`GenerationSettings` (``radfm ask --server``, every flag check)
without paying seconds for libraries they never use.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from .errors import PromptError, RadFMError
from .tokenizer import EOS_ID, RadFMTokenizer, StreamDecoder

if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache


@contextlib.contextmanager
def explain_out_of_memory(what: str):
    """Turn a CUDA out-of-memory error into an actionable RadFMError, freeing the cache."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise RadFMError(
            f"GPU out of memory while {what}: use a lower precision (bfloat16, int8, int4), "
            f"fewer slices, or close other GPU programs ({str(exc).splitlines()[0]})"
        ) from exc


@dataclass
class GenerationSettings:
    """How to pick tokens. ``temperature == 0`` is greedy (the default, as RadFM was evaluated)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):  # NaN passes every comparison below
                raise PromptError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise PromptError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PromptError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise PromptError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise PromptError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    token_ids: list[int]  # new tokens, including EOS when the model produced it
    text: str
    stop_reason: str  # "eos", "length" (max_new_tokens), "context" (the model's context is full) or "cancelled"
    prompt_tokens: int
    time_to_first_token_s: float | None
    total_s: float
    timings: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.total_s - (self.time_to_first_token_s or 0.0)
        return (len(self.token_ids) - 1) / decode_s if len(self.token_ids) > 1 and decode_s > 0 else 0.0


def pick_token(
    logits: torch.Tensor, settings: GenerationSettings, history: torch.Tensor | None,
    generator: torch.Generator | None,
) -> int:
    """Next token from ``logits [V]`` (float32); ``history`` holds the ids seen so far (read only with a
    repetition penalty, so None without one)."""
    import torch

    if settings.repetition_penalty != 1.0 and history.numel():
        seen = logits[history]
        logits = logits.clone()
        logits[history] = torch.where(seen < 0, seen * settings.repetition_penalty, seen / settings.repetition_penalty)
    if settings.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / settings.temperature
    if settings.top_k:
        kth = torch.topk(logits, min(settings.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= settings.top_p  # keep the token crossing top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_budget(prompt_tokens: int, settings: GenerationSettings, max_positions: int,
                 context: str = "the model's context") -> int:
    """New tokens an answer may have: the setting, cut to what the context has left (``context`` names it)."""
    budget = min(settings.max_new_tokens, max_positions - prompt_tokens)
    if budget < 1:
        raise PromptError(f"the prompt has {prompt_tokens} tokens; {context} holds {max_positions}")
    return budget


class DynamicDecoder:
    """The default forward passes: a KV cache that grows token by token (transformers' DynamicCache)."""

    def __init__(self, lang_model):
        self._lm = lang_model
        self._cache: DynamicCache | None = None

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """Logits ``[1, 1, V]`` after the prompt; starts a fresh cache."""
        from transformers import DynamicCache

        self._cache = DynamicCache()
        return self._lm(inputs_embeds=embeds, cache=self._cache, use_cache=True, logits_to_keep=1).logits

    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits ``[1, 1, V]`` after ``token``, which sits at ``position``."""
        import torch

        ids = torch.tensor([[token]], device=self._lm.device)
        return self._lm(input_ids=ids, cache=self._cache, use_cache=True).logits


class CompiledDecoder:
    """The opt-in GPU fast path: one preallocated KV cache and a ``torch.compile``d one-token step.

    A static cache keeps every tensor's shape and address fixed from token to token, which
    lets ``torch.compile`` capture the decode step once (as a CUDA graph on a GPU) instead
    of launching hundreds of small kernels per token. The price: compiling on the first
    answer (tens of seconds), and a cache sized for the whole context, allocated once and
    reused by every answer (so one generation at a time per engine, as the worker runs).
    """

    def __init__(self, lang_model, max_positions: int):
        import torch
        from transformers import StaticCache

        self._lm = lang_model
        self._cache = StaticCache(config=lang_model.config, max_cache_len=max_positions)
        mode = "reduce-overhead" if lang_model.device.type == "cuda" else None
        self._compiled_step = torch.compile(self._step, mode=mode, fullgraph=True)

    def _step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._lm(input_ids=ids, cache=self._cache, cache_position=positions, use_cache=True).logits

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        import torch

        self._cache.reset()
        positions = torch.arange(embeds.shape[1], device=embeds.device)
        return self._lm(inputs_embeds=embeds, cache=self._cache, cache_position=positions,
                        use_cache=True, logits_to_keep=1).logits

    def step(self, token: int, position: int) -> torch.Tensor:
        import torch

        device = self._lm.device
        logits = self._compiled_step(torch.tensor([[token]], device=device), torch.tensor([position], device=device))
        return logits.clone()  # a CUDA graph overwrites its output on the next step


class StreamedAnswer:
    """What every generation offers, local or on a vLLM server: iterate for text deltas,
    ``result`` once finished, ``cancel()`` from any thread. ``runs_elsewhere``: the work is done by
    another server, so iterating it costs this process nothing and several may stream at once."""

    runs_elsewhere = False

    def __init__(self):
        self._cancel = threading.Event()
        self.result: GenerationResult | None = None

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[str]:
        raise NotImplementedError

    def run(self, on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Generate to the end, passing each delta to ``on_text``."""
        for delta in self:
            if on_text:
                on_text(delta)
        return self.result


class Generation(StreamedAnswer):
    """One answer being generated. Iterate for text deltas; ``result`` once finished.

    ``cancel()`` may be called from any thread: no further forward pass starts after it.
    """

    def __init__(
        self,
        decoder: "DynamicDecoder | CompiledDecoder",
        tokenizer: RadFMTokenizer,
        prompt_ids: torch.Tensor,
        embeds: torch.Tensor,
        settings: GenerationSettings,
        max_positions: int,
    ):
        self._decoder = decoder
        self._tokenizer = tokenizer
        self._prompt_ids = prompt_ids
        self._embeds = embeds
        self.settings = settings
        self._budget = token_budget(prompt_ids.shape[1], settings, max_positions)
        super().__init__()

    def token_ids(self) -> Iterator[int]:
        """The raw loop: yields each new token id; sets ``self.result`` at the end."""
        import torch

        device = self._embeds.device
        generator = None
        if self.settings.seed is not None and self.settings.temperature > 0:
            generator = torch.Generator(device=device).manual_seed(self.settings.seed)
        penalized = self.settings.repetition_penalty != 1.0  # only the penalty reads the ids said so far
        history = None
        if penalized:
            history = self._prompt_ids[0][self._prompt_ids[0] < self._tokenizer.vocab_size].to(device)
        ids: list[int] = []
        start = time.perf_counter()
        first_token_s = None
        stop = "cancelled"
        position = self._prompt_ids.shape[1]
        with torch.inference_mode(), explain_out_of_memory("generating"):
            if not self._cancel.is_set():
                logits = self._decoder.prefill(self._embeds)
            while not self._cancel.is_set():
                token = pick_token(logits[0, -1].float(), self.settings, history, generator)
                first_token_s = first_token_s or time.perf_counter() - start
                ids.append(token)
                yield token
                if token == EOS_ID:
                    stop = "eos"
                    break
                if len(ids) >= self._budget:  # "context": cut short of max_new_tokens by the context's end
                    stop = "length" if self._budget == self.settings.max_new_tokens else "context"
                    break
                if self._cancel.is_set():
                    break
                if penalized:  # on a GPU each is a host-to-device copy
                    history = torch.cat([history, torch.tensor([token], device=device)])
                logits = self._decoder.step(token, position)
                position += 1
        self.result = GenerationResult(
            token_ids=ids,
            text=self._tokenizer.decode([i for i in ids if i != EOS_ID]),
            stop_reason=stop,
            prompt_tokens=int(self._prompt_ids.shape[1]),
            time_to_first_token_s=first_token_s,
            total_s=time.perf_counter() - start,
        )

    def __iter__(self) -> Iterator[str]:
        """Text deltas that concatenate to ``result.text``."""
        decoder = StreamDecoder(self._tokenizer)
        for token in self.token_ids():
            delta = decoder.push(token) if token != EOS_ID else ""
            if delta:
                yield delta
        tail = decoder.finish()
        if tail:
            yield tail
