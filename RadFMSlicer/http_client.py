"""HTTP for every client of ours: one request, its error message, a server-sent event stream.

Below both users: :mod:`RadFMSlicer.remote` (a ``radfm serve`` server) and
:mod:`RadFMSlicer.vllm_client` (a vLLM server). Only the standard library, so the Slicer
side needs nothing new.
"""

import http.client
import json
import ssl
from urllib.parse import urlsplit

from .errors import RadFMError


class ServerUnavailable(RadFMError):
    """The server cannot answer now (unreachable, gone mid-answer, the token refused, its queue
    full): the question was not at fault, so a run of many questions stops here instead of
    failing every one that follows."""


def split_http_url(url: str):
    """``url``'s parts, or a :class:`RadFMError` naming ``url`` as given when it is no http(s) address."""
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # a port that is not a number or out of range, a broken [IPv6] host
        valid = False
    if not valid:
        raise RadFMError(f"{url!r} is not an http(s) address (e.g. http://127.0.0.1:8765)")
    return parts


def http_request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
                 timeout: float = 30.0, what: str = "the server") -> http.client.HTTPResponse:
    """One request; the response is returned unread (stream it or ``read()`` it)."""
    parts = split_http_url(url)
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                                 context=ssl.create_default_context())
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request(method, path or "/", body=body, headers=headers or {})
        return connection.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        connection.close()
        raise ServerUnavailable(f"cannot reach {what} at {parts.scheme}://{parts.netloc}: {exc}") from exc


def read_error(response: http.client.HTTPResponse) -> str:
    """The one-line message of an error response (``{"detail": ...}`` or OpenAI's ``{"error": ...}``)."""
    raw = response.read(64 << 10)
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace").strip()[:300] or response.reason
    return error_text(body)


def error_text(body) -> str:
    """The message of an error body: ours (``{"detail": ...}``) or OpenAI's (``{"error": {"message": ...}}``,
    also what vLLM streams when an answer fails after its 200)."""
    error = (body.get("detail") or body.get("error") or body.get("message") or body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message") or json.dumps(error)
    return str(error)


def iter_sse(response):
    """``(event, data)`` per server-sent event; ``event`` is "message" when the stream names none."""
    event, data = "message", []
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield event, "\n".join(data)
