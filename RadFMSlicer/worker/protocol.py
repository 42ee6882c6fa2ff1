"""What the worker and its clients agree on: ops, events, the protocol version.

One request is a JSON object ``{"id": ..., "op": ..., ...fields}``. Every reply and
streamed event is ``{"id": ..., "event": "status"|"token"|"done"|"error", "text": ...,
"data": {...}}`` carrying the id of the request it belongs to; each request ends with
exactly one final event (``done`` or ``error``). Quick ops are answered at once, work ops
are served one at a time in arrival order.
"""

import json
from dataclasses import dataclass, field

PROTOCOL_VERSION = 1
QUICK_OPS = ("hello", "status", "cancel", "shutdown")
WORK_OPS = ("load", "encode", "ask", "unload")
OPS = QUICK_OPS + WORK_OPS
FINAL = ("done", "error")


@dataclass
class Event:
    kind: str  # "status", "token", "done" or "error"
    text: str = ""
    data: dict = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.kind in FINAL

    def to_line(self, request_id) -> str:
        """The event as one protocol line (no newline)."""
        return json.dumps({"id": request_id, "event": self.kind, "text": self.text, "data": self.data})

    @classmethod
    def from_message(cls, message: dict) -> "Event":
        return cls(message.get("event", "error"), message.get("text", ""), message.get("data") or {})


def ask_request_from_json(request: dict):
    """An AskRequest from the fields of an ``ask`` (or ``encode``) line."""
    from ..ask import AskRequest, ImageInput, RegionInput
    from ..generation import GenerationSettings

    settings_keys = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
    settings = GenerationSettings(**{k: request[k] for k in settings_keys if request.get(k) is not None})
    window = request.get("window")
    return AskRequest(
        task=request.get("task") or ("vqa" if request.get("question") else "report"),
        question=request.get("question"),
        images=[ImageInput.from_json(i) for i in request.get("images") or []],
        regions=[RegionInput.from_json(r) for r in request.get("regions") or []],
        history=request.get("history"),
        window=",".join(str(v) for v in window) if isinstance(window, (list, tuple)) else window,
        interpolation=request.get("interpolation") or "nearest",
        settings=settings,
        include_previous_turns=bool(request.get("previous_turns")),
        preview_dir=request.get("preview_dir"),
    )
