"""What the worker and its clients agree on: ops, events, the protocol version.

One request is a JSON object ``{"id": ..., "op": ..., ...fields}``. Every reply and
streamed event is ``{"id": ..., "event": "status"|"token"|"done"|"error", "text": ...,
"data": {...}}`` carrying the id of the request it belongs to; each request ends with
exactly one final event (``done`` or ``error``). Quick ops are answered at once, work ops
are served one at a time in arrival order.
"""

import json
import math
from dataclasses import dataclass, field

from ..errors import RequestError

PROTOCOL_VERSION = 1
QUICK_OPS = ("hello", "status", "cancel", "shutdown")
WORK_OPS = ("load", "encode", "ask", "unload")
OPS = QUICK_OPS + WORK_OPS
FINAL = ("done", "error")
HEARTBEAT = "heartbeat"  # id None: the worker's own thread says it is alive (see WorkerClient's hang_timeout)
MAX_LINE_BYTES = 16 * 2**20  # one request line; arrays travel as .npy files, never inside JSON
MAX_TEXT_CHARS = 20_000  # question, history and each earlier turn; far above the model's context


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


def check_envelope(request) -> None:
    """The parts every request needs before anything else reads it: an object, its id and op."""
    if not isinstance(request, dict):
        raise RequestError(f"a request is a JSON object, got {type(request).__name__}")
    if not is_request_id(request.get("id")):
        raise RequestError(f"'id' must be a string or an integer, got {type(request.get('id')).__name__}")
    op = request.get("op")
    if not isinstance(op, str):
        raise RequestError(f"'op' must be one of {', '.join(OPS)}, got {type(op).__name__}")
    if op not in OPS:
        raise RequestError(f"unknown op {op[:40]!r}; known: {', '.join(OPS)}")
    if op == "cancel" and not is_request_id(request.get("target")):
        raise RequestError(f"cancel's 'target' must be a request id (string or integer), "
                           f"got {type(request.get('target')).__name__}")


def is_request_id(value) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _text(name, value, limit=MAX_TEXT_CHARS):
    if not isinstance(value, str):
        raise RequestError(f"'{name}' must be text, got {type(value).__name__}")
    if len(value) > limit:
        raise RequestError(f"'{name}' is {len(value):,} characters long; at most {limit:,} are accepted")


def _integer(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RequestError(f"'{name}' must be an integer >= {low}, got {value!r}")


def _number(name, value, low, high=math.inf, low_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (low_open and value == low) or value > high:
        bounds = f"{'>' if low_open else '>='} {low:g}" + ("" if high == math.inf else f" and <= {high:g}")
        raise RequestError(f"'{name}' must be a finite number {bounds}, got {value!r}")


def _list(name, value):
    if not isinstance(value, list):
        raise RequestError(f"'{name}' must be a list, got {type(value).__name__}")


def _turns(name, value):
    _list(name, value)
    for n, turn in enumerate(value):
        if not (isinstance(turn, list) and len(turn) == 2):
            raise RequestError(f"'{name}[{n}]' must be a [question, answer] pair, got {turn!r:.60}")
        _text(f"{name}[{n}] question", turn[0])
        _text(f"{name}[{n}] answer", turn[1])


def _window(name, value):
    if not isinstance(value, (str, list, dict)):
        raise RequestError(f"'{name}' must be a preset name, [center, width] or an object, got {type(value).__name__}")


def _boolean(name, value):
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {value!r}")


_ASK_FIELDS = {
    "task": _text, "question": _text, "history": _text, "images": _list, "regions": _list, "window": _window,
    "interpolation": _text, "preview_dir": _text, "previous_turns": _turns,
    "max_new_tokens": lambda n, v: _integer(n, v, 1), "temperature": lambda n, v: _number(n, v, 0),
    "top_p": lambda n, v: _number(n, v, 0, 1, low_open=True), "top_k": lambda n, v: _integer(n, v, 0),
    "repetition_penalty": lambda n, v: _number(n, v, 0, low_open=True), "seed": lambda n, v: _integer(n, v, 0),
    "attention": _boolean,  # also write the resampler attention on the current study's grid (a .npy)
}
FIELDS = {
    "ask": _ASK_FIELDS,
    "encode": {"images": _list, "window": _window, "interpolation": _text},
    "load": {"checkpoint": _text, "device": _text, "dtype": _text, "quantization": _text,
             "compile_decode": _boolean, "vllm_url": _text},
    "unload": {},
}


def check_fields(request: dict) -> None:
    """Every field a work op reads has the right type and a sane value (None means "default")."""
    for name, check in FIELDS.get(request["op"], {}).items():
        if request.get(name) is not None:
            check(name, request[name])
    if request["op"] == "ask" and request.get("attention") and not request.get("preview_dir"):
        raise RequestError("'attention' needs 'preview_dir': the map is written there as a .npy file")


WORKER_ONLY = ("id", "op", "previous_turns", "attention")  # read by the worker itself, not part of the AskRequest


def ask_request_from_json(request: dict):
    """An AskRequest from the fields of an ``ask`` (or ``encode``) line; a field neither reads is refused."""
    from ..ask import AskRequest

    fields = {k: v for k, v in request.items() if k not in WORKER_ONLY}
    return AskRequest.from_dict({**fields, "include_previous_turns": bool(request.get("previous_turns"))})
