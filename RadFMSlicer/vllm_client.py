"""The LLM half on a vLLM server: RadFM's merged prompt embeddings in, streamed text out.

vLLM (started with ``--enable-prompt-embeds`` on the folder ``radfm convert --for-vllm``
writes) batches many readers' answers on one GPU and spreads a model over several. Our
side keeps what vLLM does not know about: the vision encoder, the encoding cache and the
merge of image tokens into the text embeddings. Each answer is one OpenAI Completions
request whose ``prompt_embeds`` field is base64 of ``torch.save`` of the ``[L, hidden]``
prompt embeddings (vLLM decodes it with ``torch.load(weights_only=True)``), streamed back
as server-sent events.

:class:`VLLMGeneration` behaves as :class:`~RadFMSlicer.generation.Generation` does
(iterate for text deltas, ``result`` at the end, ``cancel()`` from any thread), so the
engine, the worker and the HTTP server do not care which one produced an answer. It runs
elsewhere (``runs_elsewhere``): the worker streams several at once while it encodes the
next question, and vLLM batches them.

An answer that vLLM does not finish is a failure, never a stop: a stream that ends without
a ``finish_reason`` (vLLM killed or gone) raises :class:`~RadFMSlicer.http_client.ServerUnavailable`,
and an error vLLM sends inside its 200 stream (``data: {"error": ...}``) raises a
:class:`~RadFMSlicer.errors.RadFMError` with vLLM's own message. The words streamed before
are the caller's to keep, as with a ``radfm serve`` that goes away mid-answer.
"""

import base64
import http.client
import io
import json
import time
from typing import Iterator

import torch

from .errors import RadFMError
from .generation import GenerationResult, GenerationSettings, StreamedAnswer, token_budget
from .http_client import ServerUnavailable, error_text, http_request, iter_sse, read_error
from .tokenizer import EOS_ID

STOP_REASONS = {"stop": "eos", "length": "length"}  # vLLM's finish_reason -> ours ("length" may become "context")
VLLM_CONTEXT = "the vLLM server's context (its --max-model-len)"


def prompt_embeds_field(embeds: torch.Tensor) -> str:
    """``embeds [L, hidden]`` (or ``[1, L, hidden]``) as vLLM's ``prompt_embeds`` string."""
    if embeds.ndim == 3 and embeds.shape[0] == 1:
        embeds = embeds[0]
    if embeds.ndim != 2:
        raise RadFMError(f"prompt embeddings must be [L, hidden], got {list(embeds.shape)}")
    buffer = io.BytesIO()
    torch.save(embeds.detach().to("cpu").contiguous().clone(), buffer)  # clone: save the view's own storage only
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def completion_body(model: str, embeds: torch.Tensor, settings: GenerationSettings, max_tokens: int) -> dict:
    """The JSON body of one streamed Completions request for these embeddings and settings."""
    body = {
        "model": model,
        "prompt_embeds": prompt_embeds_field(embeds),
        "max_tokens": max_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "repetition_penalty": settings.repetition_penalty,
        "stop_token_ids": [EOS_ID],  # what RadFM was trained to stop on, whatever the folder's config says
        "skip_special_tokens": True,
        "return_token_ids": True,  # recorded in the result; older vLLM ignores the field
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if settings.top_k:
        body["top_k"] = settings.top_k
    if settings.seed is not None:
        body["seed"] = settings.seed
    return body


class VLLMBackend:
    """One vLLM server; ``start`` turns prompt embeddings into a streamed answer.

    Connecting reads what it serves from ``/v1/models``: the model's name and its context
    limit (``max_model_len``, vLLM's ``--max-model-len``), which every answer is budgeted and
    refused against before it is sent."""

    def __init__(self, url: str, timeout: float = 600.0):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.timeout = timeout
        self.model, self.max_model_len = self._served_model()

    def _served_model(self) -> tuple[str, int | None]:
        """The name vLLM serves (the folder it was started on, unless renamed) and its context limit
        (None from a server that does not say: the checkpoint's then holds)."""
        response = http_request(f"{self.url}/v1/models", timeout=30, what="the vLLM server")
        if response.status != 200:
            raise RadFMError(f"the vLLM server at {self.url} answered {response.status}: {read_error(response)}")
        models = json.loads(response.read()).get("data") or []
        if not models:
            raise RadFMError(f"the vLLM server at {self.url} serves no model")
        return models[0]["id"], models[0].get("max_model_len")

    def start(self, prompt_ids: torch.Tensor, embeds: torch.Tensor, settings: GenerationSettings,
              max_positions: int) -> "VLLMGeneration":
        """The answer, not yet sent; a prompt that leaves no room in vLLM's context is refused here."""
        prompt_tokens = int(prompt_ids.shape[-1])
        if self.max_model_len is not None and self.max_model_len < max_positions:
            budget = token_budget(prompt_tokens, settings, self.max_model_len, VLLM_CONTEXT)
        else:
            budget = token_budget(prompt_tokens, settings, max_positions)
        return VLLMGeneration(self, completion_body(self.model, embeds, settings, budget), prompt_tokens,
                              cut_by_context=budget < settings.max_new_tokens)

    def describe(self) -> dict:
        return {"llm_backend": "vllm", "vllm_url": self.url, "vllm_model": self.model,
                "vllm_max_model_len": self.max_model_len}


class VLLMGeneration(StreamedAnswer):
    """One answer streamed from vLLM; closing the stream (cancel) makes vLLM abort it."""

    runs_elsewhere = True

    def __init__(self, backend: VLLMBackend, body: dict, prompt_tokens: int, cut_by_context: bool = False):
        super().__init__()
        self._backend = backend
        self._body = body
        self._prompt_tokens = prompt_tokens
        self._cut_by_context = cut_by_context  # vLLM's "length" then means the context is full

    def __iter__(self) -> Iterator[str]:
        start = time.perf_counter()
        first_token_s, parts, token_ids, finish, new_tokens = None, [], [], None, None
        url = self._backend.url
        if not self._cancel.is_set():
            response = http_request(f"{url}/v1/completions", "POST", json.dumps(self._body).encode(),
                                    {"Content-Type": "application/json"}, self._backend.timeout, "the vLLM server")
            if response.status != 200:
                raise RadFMError(f"the vLLM server refused the answer ({response.status}): {read_error(response)}")
            try:
                for _, data in iter_sse(response):
                    if self._cancel.is_set() or data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        raise RadFMError(f"the vLLM server failed mid-answer: {error_text(chunk)}")
                    if chunk.get("usage"):
                        new_tokens = chunk["usage"].get("completion_tokens")
                    for choice in chunk.get("choices") or []:
                        token_ids += choice.get("token_ids") or []
                        if choice.get("text"):
                            first_token_s = first_token_s or time.perf_counter() - start
                            parts.append(choice["text"])
                            yield choice["text"]
                        finish = choice.get("finish_reason") or finish
            except (OSError, ValueError, http.client.HTTPException) as exc:
                if not self._cancel.is_set():
                    raise ServerUnavailable(f"the vLLM server at {url} went away mid-answer ({exc}); ask again") from exc
            finally:
                response.close()
            if not self._cancel.is_set() and finish not in STOP_REASONS:
                raise ServerUnavailable(
                    f"the vLLM server at {url} ended the answer without finishing it "
                    f"({f'finish_reason {finish!r}' if finish else 'stopped, restarted or crashed'}); ask again")
        stop = "cancelled" if self._cancel.is_set() else STOP_REASONS[finish]
        if stop == "length" and self._cut_by_context:
            stop = "context"
        self.result = GenerationResult(
            token_ids=token_ids, text="".join(parts), stop_reason=stop, prompt_tokens=self._prompt_tokens,
            time_to_first_token_s=first_token_s, total_s=time.perf_counter() - start,
            timings={"llm_backend": "vllm", "completion_tokens": new_tokens},
        )
