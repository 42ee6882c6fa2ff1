"""A RadFM server (``radfm serve``) used like a local worker: :class:`RemoteClient`.

``RemoteClient(url, token)`` has the methods and events of
:class:`~RadFMSlicer.worker.WorkerClient`, so the panel and the CLI switch between "this
computer" and "a server" by a setting. What leaves the workstation is voxels, geometry,
modality and the prompt: scans are read here (DICOM tags, file and node names stay
here), uploaded by content id (a scan already on the server is not sent again), and the
provenance that names the scan is completed here when the answer arrives.

Only the standard library is used, so the Slicer side needs nothing new.
"""

import hashlib
import http.client
import io
import itertools
import json
import threading
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import RadFMError
from .http_client import ServerUnavailable, http_request, iter_sse, read_error, split_http_url
from .image_cache import LRUCache, cached, source_identity
from .worker import Event, Request, WorkerError
from .worker.client import answer_history, previous_turns_param

API = "/v1"
UPLOAD_FIELDS = ("voxels", "ijk_to_ras")  # the members of an upload (.npz); nothing else is accepted
CLIENT_HEADER = "X-RadFM-Client"  # an anonymous per-client id: the server queues fairly across these
# Display voxels are indexed (slice, row, column); an IJK matrix takes (column, row, slice).
DISPLAY_TO_IJK_COLUMNS = [2, 1, 0, 3]
SCANS_KEPT = 2  # scans a client keeps read (voxels and id) for the next encode or question about them


# =============================================================================== uploads
def image_id(voxels: np.ndarray, ijk_to_ras: np.ndarray) -> str:
    """Content address of an upload: the same voxels and geometry always get the same id."""
    voxels = np.ascontiguousarray(voxels)
    digest = hashlib.sha256(f"{voxels.dtype.str}{voxels.shape}".encode())
    digest.update(memoryview(voxels).cast("B"))
    digest.update(np.asarray(ijk_to_ras, dtype=np.float64).tobytes())
    return digest.hexdigest()


def upload_body(voxels: np.ndarray, ijk_to_ras: np.ndarray) -> bytes:
    """An upload: a compressed ``.npz`` of the voxels and their 4x4 IJK->RAS matrix, nothing else."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, voxels=np.ascontiguousarray(voxels), ijk_to_ras=np.asarray(ijk_to_ras, np.float64))
    return buffer.getvalue()


class _Pixels(NamedTuple):
    """What a scan sends, read and hashed once per unchanged source (a follow-up reuses it)."""

    volume: object  # the Volume of a file; None for an array (its own grid)
    voxels: np.ndarray
    matrix: np.ndarray
    modality: str | None
    id: str


def _read_pixels(image, index: int) -> _Pixels:
    if image.array is not None:  # a Slicer array: its own grid, so masks and IJK boxes stay valid
        if image.ijk_to_ras is None:
            raise RadFMError(f"image {image.name or index + 1}: an array needs its ijk_to_ras matrix")
        voxels, matrix = np.asarray(image.array), np.asarray(image.ijk_to_ras, float)
        return _Pixels(None, voxels, matrix, None, image_id(voxels, matrix))
    volume = image.load()  # a file: read here, sent in display order with the matching matrix
    matrix = volume.display_to_ras[:, DISPLAY_TO_IJK_COLUMNS]  # the server reads it as is
    return _Pixels(volume, volume.voxels, matrix, volume.modality, image_id(volume.voxels, matrix))


class _Scan:
    """One image as it leaves the workstation: voxels and geometry, its local name kept here.

    ``pixels``: a client's recent reads by source identity, so the encode ahead of a question and the
    question itself (and each follow-up) read and hash an unchanged scan once."""

    def __init__(self, item, index: int, pixels: LRUCache):
        from .ask import ImageInput

        image = ImageInput.from_json(item) if not isinstance(item, ImageInput) else item
        self.role, self.window = image.role, image.window
        identity = source_identity(image) if pixels.keeps else None
        self.volume, self.voxels, self.matrix, self.modality, self.id = cached(
            pixels, identity, lambda: _read_pixels(image, index))
        self.label = image.name or (f"image {index + 1}" if image.array is not None else Path(image.path).name)

    def region(self, region, mask_id: str | None) -> dict:
        """A region as the server takes it: a box, or an uploaded mask; its name stays here (the prompt calls
        it by kind and number on both sides)."""
        entry = {"image": region.image, "label": region.label,
                 "margin_mm": region.margin_mm, "box_ras": region.box_ras, "box_ijk": region.box_ijk,
                 "mask_id": mask_id}
        if self.volume is not None and region.box_ijk is not None:  # IJK of the file's grid -> RAS corners
            corners = np.c_[np.asarray(region.box_ijk, float), np.ones(2)] @ self.volume.ijk_to_ras.T
            entry["box_ras"], entry["box_ijk"] = corners[:, :3].tolist(), None
        return {k: v for k, v in entry.items() if v is not None}

    def mask(self, region) -> np.ndarray:
        """The region's label map on the grid of the uploaded voxels."""
        from .regions import load_mask

        if self.volume is None:
            return np.asarray(np.load(region.mask, allow_pickle=False) if isinstance(region.mask, str) else region.mask)
        mask = load_mask(region.mask, self.volume) if isinstance(region.mask, (str, Path)) else region.mask
        return self.volume.to_display(mask)


# =============================================================================== client
class RemoteRequest(Request):
    """One request to the server, with the events of a worker request."""

    def __init__(self, client: "RemoteClient", request_id: str, op: str):
        super().__init__(client, request_id, op)
        self.server_id: str | None = None
        self._cancel_wanted = False

    def cancel(self) -> None:
        if self.finished:
            return
        self._cancel_wanted = True
        if self.server_id:
            self.client._cancel(self.server_id)


class RemoteClient:
    """Talks to ``radfm serve``; the methods and events of :class:`~RadFMSlicer.worker.WorkerClient`."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0):
        split_http_url(url)  # checked once, as given: before any scan is read or uploaded
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex
        self._ids = itertools.count(1)
        self._history = answer_history()
        self._pixels = LRUCache(SCANS_KEPT)
        self._pixels_lock = threading.Lock()  # encode (caller's thread) and asks (their own threads) share it
        self.load_args: dict | None = None
        self.restarts = 0  # the server restarts its own worker; nothing to count here
        self._closed = False

    @classmethod
    def start(cls, url: str, token: str | None = None, **kwargs) -> "RemoteClient":
        client = cls(url, token, **kwargs)
        client.hello()
        return client

    # --- HTTP -------------------------------------------------------------------------------
    def _headers(self, content_type: str | None = None) -> dict:
        headers = {CLIENT_HEADER: self.client_id}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _call(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
              ok=(200,), timeout: float = 60.0):
        response = http_request(self.url + API + path, method, body, self._headers(content_type), timeout,
                                "the RadFM server")
        if response.status not in ok:
            message = read_error(response)
            if response.status == 401 and not self.token:
                raise ServerUnavailable("this server needs a token: pass --token-file FILE "
                                        "(in Slicer: fill in the RadFM panel's Token)")
            if response.status == 401:
                message = "the RadFM server refused the token (check the token for this server)"
            error = ServerUnavailable if response.status in (401, 429) else WorkerError
            raise error(f"the RadFM server answered {response.status}: {message}")
        return response

    def _json(self, method: str, path: str, payload=None, timeout: float = 60.0) -> dict:
        body = json.dumps(payload).encode() if payload is not None else None
        response = self._call(method, path, body, "application/json" if body else None, timeout=timeout)
        return json.loads(response.read() or b"{}")

    # --- process-like surface ------------------------------------------------------------------
    @property
    def pid(self) -> None:
        return None  # the model runs on the server

    def alive(self) -> bool:
        return not self._closed

    def stderr_tail(self) -> list[str]:
        return []

    # --- API --------------------------------------------------------------------------------------
    def hello(self, timeout: float = 30) -> dict:
        try:
            return self._json("GET", "/health", timeout=timeout)
        except RadFMError as exc:
            raise WorkerError(str(exc)) from exc

    def load(self, folder=None, *args, timeout: float = 60, **kwargs) -> dict:
        """The server keeps its own model: this checks that it is reachable, authorised and loaded."""
        info = self.status(timeout)
        if not info.get("loaded"):
            raise WorkerError("the RadFM server has no model loaded yet (it may still be loading): try again shortly")
        self.load_args = {"server": self.url}
        return {"model": info.get("model"), "server": self.url}

    def status(self, timeout: float = 30) -> dict:
        try:
            return self._json("GET", "/model", timeout=timeout)
        except RadFMError as exc:
            raise WorkerError(str(exc)) from exc

    def unload(self, timeout: float = 60) -> dict:
        self.load_args = None
        return {"text": "the server keeps its model loaded for every reader"}

    def close(self, timeout: float = 5.0) -> None:
        self._closed = True

    def __enter__(self) -> "RemoteClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def upload(self, voxels: np.ndarray, ijk_to_ras: np.ndarray, known_id: str | None = None) -> str:
        """The server's id for this image, uploading it only if the server does not have it."""
        known_id = known_id or image_id(voxels, ijk_to_ras)
        response = self._call("GET", f"/images/{known_id}", ok=(200, 404))
        response.read()
        if response.status == 200:
            return known_id
        body = upload_body(voxels, ijk_to_ras)
        data = json.loads(self._call("POST", "/images", body, "application/octet-stream", timeout=self.timeout).read())
        return data["id"]

    def _scans(self, images) -> list[_Scan]:
        with self._pixels_lock:
            return [_Scan(item, k, self._pixels) for k, item in enumerate(images)]

    def encode(self, images, window=None) -> Request:
        """Send the scans ahead of a question (the server encodes on the first ask)."""
        request = RemoteRequest(self, f"r{next(self._ids)}", "encode")
        try:
            scans = self._scans(images)
            ids = [self.upload(s.voxels, s.matrix, s.id) for s in scans]
            request.push(Event("done", f"{len(ids)} image(s) on the server", {"images": ids}))
        except (RadFMError, WorkerError, OSError) as exc:
            request.push(Event("error", str(exc), {"kind": type(exc).__name__}))
        return request

    def ask(self, question: str | None = None, images=(), task: str | None = None, regions=(), history=None,
            window=None, max_new_tokens: int = 256, include_previous_turns: bool = False,
            previous_turns=None, **settings) -> Request:
        """Start an answer; returns at once. Iterate ``req.events()`` or ``req.poll()``."""
        request = RemoteRequest(self, f"r{next(self._ids)}", "ask")
        settings.pop("preview_dir", None)
        payload = {"task": task, "question": question, "history": history, "window": window,
                   "interpolation": settings.pop("interpolation", None),
                   "settings": {"max_new_tokens": max_new_tokens, **settings},
                   "previous_turns": previous_turns_param(include_previous_turns, previous_turns, self._history)}
        threading.Thread(target=self._run_ask, args=(request, payload, list(images), list(regions)),
                         name="radfm-remote-ask", daemon=True).start()
        return request

    def _run_ask(self, request: RemoteRequest, payload: dict, images: list, regions: list) -> None:
        from .ask import RegionInput

        labels = []
        try:
            request.push(Event("status", "sending the scan to the server"))
            scans = self._scans(images)
            payload["images"] = [{"id": self.upload(s.voxels, s.matrix, s.id), "role": s.role, "window": s.window,
                                  "modality": s.modality} for s in scans]
            labels = [s.label for s in scans]
            payload["regions"] = []
            for n, item in enumerate(regions, 1):
                region = item if isinstance(item, RegionInput) else RegionInput.from_json(item)
                if not 0 <= region.image < len(scans):
                    raise RadFMError(f"region {region.name or n!r} refers to image {region.image + 1}, "
                                     f"but {len(scans)} image(s) were given")
                scan = scans[region.image]
                mask_id = None
                if region.mask is not None:
                    mask = scan.mask(region)
                    mask_id = self.upload(mask, scan.matrix)
                payload["regions"].append(scan.region(region, mask_id))
                labels.append(region.name)
            response = self._call("POST", "/ask", json.dumps(payload).encode(), "application/json",
                                  timeout=self.timeout)
        except (RadFMError, WorkerError, OSError) as exc:
            request.push(Event("error", str(exc), {"kind": type(exc).__name__}))
            return
        self._read_stream(request, response, labels)

    def _read_stream(self, request: RemoteRequest, response, labels: list[str]) -> None:
        try:
            for kind, data in iter_sse(response):
                message = json.loads(data)
                event = Event(kind, message.get("text", ""), message.get("data") or {})
                if kind == "status" and event.data.get("ask_id") and request.server_id is None:
                    request.server_id = event.data["ask_id"]
                    if request._cancel_wanted:
                        self._cancel(request.server_id)
                if kind == "done":
                    self._complete_provenance(event.data, labels)
                request.push(event)
                if event.final:
                    return
        except (OSError, ValueError, http.client.HTTPException):
            pass
        finally:
            response.close()
        request.push(Event("error", f"the RadFM server at {self.url} went away mid-answer "
                                     f"(stopped, restarted or the network dropped); ask again",
                            {"kind": "worker_died"}))

    def _complete_provenance(self, data: dict, labels: list[str]) -> None:
        """Put the local names back into the turn; the server only ever saw 'image k', 'mask k' and 'box k'."""
        turn = data.get("turn") or {}
        for record, label in zip(turn.get("images") or [], labels):
            record["label"] = label or record["label"]  # a region named by none keeps the prompt's name
            if record.get("role") != "region":
                record["source"] = label
        (turn.get("provenance") or {}).setdefault("server", self.url)
        if data.get("answer") and turn.get("question"):
            self._history.append((turn["question"], data["answer"]))

    def _cancel(self, server_id: str) -> None:
        try:
            self._call("POST", f"/asks/{server_id}/cancel", ok=(200, 404)).read()
        except (RadFMError, OSError):
            pass  # the stream reports what happened


def ask_server(client: RemoteClient, request, session=None, on_text=None, timeout: float = 600.0):
    """:func:`RadFMSlicer.ask.ask` over a server: the same request in, the same turn out (added to ``session``)."""
    from .session import Turn

    previous = session.previous_turns() if (session is not None and request.include_previous_turns) else None
    pending = client.ask(question=request.question, images=request.images, task=request.task,
                         regions=request.regions, history=request.history, window=request.window,
                         interpolation=request.interpolation, include_previous_turns=bool(previous),
                         previous_turns=previous, **request.settings.to_dict())
    for event in pending.events(timeout):
        if event.kind == "token" and on_text:
            on_text(event.text)
        elif event.kind == "error":
            gone = event.data.get("kind") in ("worker_died", ServerUnavailable.__name__)
            raise (ServerUnavailable if gone else RadFMError)(event.text)
    turn = Turn.from_dict(pending.final.data["turn"])
    if session is not None:
        session.add_turn(turn)
    return turn
