"""``radfm serve``: one model on one GPU server, shared by a reading room over HTTP.

The HTTP side never holds the model: :class:`~RadFMSlicer.worker.WorkerClient`, owned by
the app's lifespan, keeps it in the isolated worker process, so a CUDA crash ends the
worker (restarted and reloaded on the next request), not the server. Events are the
worker's own (``status``, ``token``, ``done``, ``error``), sent as server-sent events.

API (``/v1``)::

    GET  /v1/health                 {"status": "ok", "tls": ..., "token_required": ...}  (no token needed)
    GET  /v1/model                  checkpoint fingerprint, precision, device, memory, queue
    GET  /v1/images/{id}            200 when the server has this upload, else 404
    POST /v1/images                 body: .npz of ``voxels`` and ``ijk_to_ras`` -> {"id": ...}
    POST /v1/ask                    JSON question -> text/event-stream (status, token, done, error)
    POST /v1/asks/{ask_id}/cancel   stop an answer (closing the stream does too)

Security: the server binds 127.0.0.1 unless told otherwise and refuses any other address
without a token; tokens are compared in constant time and a refusal says only 401;
request bodies are never logged; uploads live only in a private (0700) cache folder
bounded by size, addressed by their content hash; image and mask paths given to the
worker are always the server's own cache files, never a path a client names.
"""

import asyncio
import collections
import contextlib
import hmac
import io
import ipaddress
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import storage
from ..errors import RadFMError
from ..remote import API, CLIENT_HEADER, UPLOAD_FIELDS, image_id
from .client import WorkerClient, WorkerError
from .protocol import Event

log = logging.getLogger("radfm.serve")

VOXEL_DTYPES = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"}
ID_PATTERN = re.compile(r"[0-9a-f]{64}")
ASK_FIELDS = {"task", "question", "images", "regions", "history", "window", "interpolation", "settings",
              "previous_turns"}
IMAGE_FIELDS = {"id", "role", "window", "modality"}
REGION_FIELDS = {"image", "mask_id", "label", "box_ras", "box_ijk", "margin_mm"}  # named by kind and number
SETTINGS_FIELDS = {"max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed"}
MIN_TOKEN_CHARS = 16


@dataclass
class ServeConfig:
    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    quantization: str | None = None
    vllm_url: str | None = None
    vllm_max_num_seqs: int = 8
    cache_dir: str | None = None
    cache_mb: float = 4096.0
    max_upload_mb: float = 1024.0
    queue_limit: int = 16

    @property
    def tls(self) -> bool:
        return bool(self.ssl_certfile)

    @property
    def answers_at_once(self) -> int:
        """How many answers the backend writes at once: our worker's LLM one, vLLM as many as it batches."""
        return self.vllm_max_num_seqs if self.vllm_url else 1

    def check(self) -> None:
        """Refuse to start an unsafe or impossible configuration, in one line."""
        if not is_loopback(self.host) and not self.token:
            raise RadFMError(f"listening on {self.host} lets other computers in: give --token-file FILE "
                             f"(a private file holding a long random token), or keep the default --host 127.0.0.1")
        if self.token is not None and len(self.token) < MIN_TOKEN_CHARS:
            raise RadFMError(f"the token is {len(self.token)} characters; use at least {MIN_TOKEN_CHARS} "
                             f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise RadFMError("TLS needs both --ssl-certfile and --ssl-keyfile")
        for name in (self.ssl_certfile, self.ssl_keyfile):
            if name and not Path(name).is_file():
                raise RadFMError(f"TLS file not found: {name}")
        for flag, value in (("--queue-limit", self.queue_limit), ("--cache-mb", self.cache_mb),
                            ("--max-upload-mb", self.max_upload_mb), ("--vllm-max-num-seqs", self.vllm_max_num_seqs)):
            if value <= 0:
                raise RadFMError(f"{flag} must be positive, got {value:g}")
        if self.max_upload_mb > self.cache_mb:
            raise RadFMError(f"--max-upload-mb {self.max_upload_mb:g} exceeds --cache-mb {self.cache_mb:g}: "
                             f"an upload must fit in the cache")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token_file(path: str) -> str:
    """The token in ``path``; a file others can read is refused (the token is a password)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise RadFMError(f"token file not found: {file}")
    if file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise RadFMError(f"token file {file} can be read by other users: chmod 600 {file}")
    token = file.read_text().strip()
    if not token:
        raise RadFMError(f"token file {file} is empty")
    return token


class HTTPError(Exception):
    """A refusal with its status and one-line message (turned into JSON ``{"detail": ...}``)."""

    def __init__(self, status: int, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


# =============================================================================== uploads
class ImageStore:
    """Uploaded images in a private folder, named by content hash, evicted least recently used by size."""

    def __init__(self, folder: str | None, limit_bytes: int, max_upload_bytes: int):
        self.owned = folder is None
        self.folder = Path(folder or tempfile.mkdtemp(prefix="radfm-uploads-")).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        storage.remove_abandoned(self.folder)  # what a server killed mid-upload left
        self.limit = limit_bytes
        self.max_upload = max_upload_bytes
        self.pinned: collections.Counter = collections.Counter()  # ids that queued or running asks need
        self._evicting = threading.Lock()

    def pin(self, ids: list[str]) -> None:
        self.pinned.update(ids)

    def unpin(self, ids: list[str]) -> None:
        self.pinned.subtract(ids)
        self.pinned = +self.pinned  # drop ids no ask needs any more

    def voxels_path(self, upload_id: str) -> Path:
        return self.folder / f"{upload_id}.npy"

    def geometry(self, upload_id: str) -> dict | None:
        """The stored matrix of ``upload_id``, or None if the server does not have it (never stored, or evicted
        while we looked: the client then sends it again)."""
        if not ID_PATTERN.fullmatch(upload_id or ""):
            return None
        meta = self.folder / f"{upload_id}.json"
        now = time.time()
        try:
            for path in (meta, self.voxels_path(upload_id)):
                os.utime(path, (now, now))  # recently used: evicted last
            return json.loads(meta.read_text())
        except FileNotFoundError:
            return None

    def put(self, body: bytes) -> str:
        """Validate an upload and store it; the id is the hash of voxels and geometry. Readers who open one
        study upload the same scan at once: each file is written whole (``storage.write_once``), voxels
        before geometry, so a file is seen whole or not at all."""
        voxels, matrix = self._read(body)
        upload_id = image_id(voxels, matrix)
        if self.geometry(upload_id) is None:
            voxels_file = io.BytesIO()
            np.save(voxels_file, voxels, allow_pickle=False)
            try:
                storage.write_once(self.voxels_path(upload_id), voxels_file.getvalue())
                storage.write_once(self.folder / f"{upload_id}.json",
                                   json.dumps({"ijk_to_ras": matrix.tolist()}).encode())
            except storage.StorageError as exc:  # a full disk is the server's trouble, told to the reader as such
                raise HTTPError(507, f"the server cannot keep the scan: {exc}") from None
            self.evict()
        return upload_id

    def _read(self, body: bytes) -> tuple[np.ndarray, np.ndarray]:
        try:
            archive = zipfile.ZipFile(io.BytesIO(body))
            members = {Path(m.filename).stem: m for m in archive.infolist()}
        except (zipfile.BadZipFile, ValueError):
            raise HTTPError(400, "the upload is not a complete .npz file (truncated?): send voxels and ijk_to_ras "
                                 "with numpy.savez_compressed") from None
        if set(members) != set(UPLOAD_FIELDS):
            raise HTTPError(400, f"an upload holds exactly {', '.join(UPLOAD_FIELDS)}; got {sorted(members)}")
        if sum(m.file_size for m in members.values()) > self.max_upload:
            raise HTTPError(413, f"the upload unpacks to more than {self.max_upload / 2**20:g} MB "
                                 f"(the server's --max-upload-mb)")
        try:
            with np.load(io.BytesIO(body), allow_pickle=False) as npz:
                voxels, matrix = npz["voxels"], npz["ijk_to_ras"]
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise HTTPError(400, f"the upload cannot be read (truncated or corrupt): {exc}") from None
        if voxels.dtype.name not in VOXEL_DTYPES:
            raise HTTPError(400, f"voxels of type {voxels.dtype} are not an image; use one of "
                                 f"{', '.join(sorted(VOXEL_DTYPES))}")
        if voxels.ndim not in (2, 3) or 0 in voxels.shape:
            raise HTTPError(400, f"voxels must be a 2D or 3D array [k, j, i], got shape {list(voxels.shape)}")
        if matrix.shape != (4, 4) or matrix.dtype.kind != "f" or not np.isfinite(matrix).all():
            raise HTTPError(400, "ijk_to_ras must be a finite 4x4 float matrix")
        return voxels, matrix

    def evict(self) -> None:
        """Drop the least recently used uploads until the folder fits its limit (pinned ones stay); one eviction
        at a time, and a file another has just removed is passed over."""
        with self._evicting:
            found = {}
            for path in self.folder.glob("*.npy"):
                with contextlib.suppress(FileNotFoundError):
                    found[path] = path.stat()
            total = sum(info.st_size for info in found.values())
            for path in sorted(found, key=lambda p: found[p].st_mtime):
                if total <= self.limit:
                    break
                if path.stem in self.pinned:
                    continue
                total -= found[path].st_size
                (self.folder / f"{path.stem}.json").unlink(missing_ok=True)
                path.unlink(missing_ok=True)

    def close(self) -> None:
        if self.owned:
            shutil.rmtree(self.folder, ignore_errors=True)


# =============================================================================== queue
class Ask:
    """One question from one client: queued, then run by the dispatcher; events go to its stream."""

    def __init__(self, ask_id: str, client: str, params: dict, pins: list[str]):
        self.id, self.client, self.params, self.pins = ask_id, client, params, pins
        self.events: asyncio.Queue = asyncio.Queue()
        self.worker_request = None
        self.cancelled = False
        self.finished = False
        self.queued_at = time.monotonic()
        self.mark = 0  # the scheduler's dispatch count when this ask was queued

    def push(self, event: Event) -> None:
        if event.final:
            self.finished = True
        self.events.put_nowait(event)


class FairQueue:
    """Asks waiting for the worker, taken round-robin across clients: one client cannot starve the others."""

    def __init__(self, limit: int):
        self.limit = limit
        self._by_client: "collections.OrderedDict[str, collections.deque[Ask]]" = collections.OrderedDict()
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_client.values())

    def add(self, ask: Ask) -> int:
        """Queue ``ask``; returns how many asks are ahead of it; refuses when full."""
        waiting = len(self)
        if waiting >= self.limit:
            raise HTTPError(429, f"busy, {waiting} ahead: the server's queue is full; ask again in a minute",
                            {"Retry-After": "30"})
        self._by_client.setdefault(ask.client, collections.deque()).append(ask)
        self._ready.set()
        return self.position(ask)

    def position(self, ask: Ask) -> int:
        """Asks that run before ``ask``: rounds of the other clients' queues up to its own place."""
        mine = list(self._by_client.get(ask.client, ()))
        rank = mine.index(ask) if ask in mine else 0
        return rank + sum(min(len(q), rank + 1) for c, q in self._by_client.items() if c != ask.client)

    def remove(self, ask: Ask) -> bool:
        queue = self._by_client.get(ask.client)
        if queue is None or ask not in queue:
            return False
        queue.remove(ask)
        if not queue:
            del self._by_client[ask.client]
        return True

    async def next(self) -> Ask:
        while not self._by_client:
            self._ready.clear()
            await self._ready.wait()
        client, queue = next(iter(self._by_client.items()))
        ask = queue.popleft()
        del self._by_client[client]
        if queue:  # this client goes to the back of the round
            self._by_client[client] = queue
        return ask


class Scheduler:
    """Decides who goes next (round-robin across clients) and relays the events; the backend decides how many
    run at once (``answers_at_once``: 1 for our worker's LLM, vLLM's --max-num-seqs for vLLM, where the worker
    encodes one question at a time and vLLM writes the answers together)."""

    POLL_S = 0.01

    def __init__(self, worker: WorkerClient, store: ImageStore, limit: int, answers_at_once: int = 1):
        self.worker = worker
        self.store = store
        self.queue = FairQueue(limit)
        self.asks: dict[str, Ask] = {}
        self.answers_at_once = answers_at_once
        self.running: set[Ask] = set()
        self._slots = asyncio.Semaphore(answers_at_once)
        self._tasks: set[asyncio.Task] = set()
        self.dispatched = 0  # asks handed to the worker so far: how many overtook an ask is checkable

    def submit(self, client: str, params: dict, pins: list[str]) -> tuple[Ask, int]:
        ask = Ask(uuid.uuid4().hex, client, params, pins)  # unguessable: only its asker can cancel it
        # It waits behind the asks queued before it and the running ones, unless a slot is left for it anyway
        # (however far the scheduler has got in taking those queued asks into slots).
        waits_behind = self.queue.add(ask) + len(self.running)
        ahead = waits_behind if waits_behind >= self.answers_at_once else 0
        ask.mark = self.dispatched
        self.asks[ask.id] = ask
        self.store.pin(pins)
        return ask, ahead

    def cancel(self, ask: Ask) -> None:
        if ask.finished or ask.cancelled:
            return
        ask.cancelled = True
        if self.queue.remove(ask):
            self._finish(ask, Event("done", "", {"answer": "", "stop_reason": "cancelled"}))
        elif ask.worker_request is not None:
            ask.worker_request.cancel()

    def _finish(self, ask: Ask, event: Event) -> None:
        ask.push(event)
        self.asks.pop(ask.id, None)
        self.store.unpin(ask.pins)

    async def run(self) -> None:
        """Whenever a slot is free, the next ask in fair order takes it."""
        while True:
            await self._slots.acquire()
            ask = await self.queue.next()
            self.running.add(ask)
            self.dispatched += 1
            task = asyncio.create_task(self._serve(ask))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, ask: Ask) -> None:
        try:
            await self._run_one(ask)
        except Exception as exc:  # keep serving: the ask gets the reason, the server goes on
            log.exception("ask %s failed in the server", ask.id)
            self._finish(ask, Event("error", f"internal server error: {type(exc).__name__}", {"kind": "internal"}))
        finally:
            self.running.discard(ask)
            self._slots.release()

    async def _run_one(self, ask: Ask) -> None:
        ask.push(Event("status", "starting", {"ask_id": ask.id, "ahead": 0,
                                              "waited_s": round(time.monotonic() - ask.queued_at, 3),
                                              "served_before": self.dispatched - 1 - ask.mark}))
        request = await asyncio.to_thread(self.worker.ask, **ask.params)  # may restart a dead worker
        ask.worker_request = request
        if ask.cancelled:
            request.cancel()
        while True:
            for event in request.poll():
                if event.final:
                    if event.kind == "error" and event.data.get("kind") == "worker_died":
                        event.data["http_status"] = 503
                    self._finish(ask, event)
                    return
                ask.push(event)
            await asyncio.sleep(self.POLL_S)


# =============================================================================== app
def sse(event: Event) -> bytes:
    return f"event: {event.kind}\ndata: {json.dumps({'text': event.text, 'data': event.data})}\n\n".encode()


def worker_params(body: dict, store: ImageStore) -> tuple[dict, list[str]]:
    """The worker's ``ask`` fields for a client's JSON, with every image mapped to our own cache file."""
    from ..ask import validate
    from ..generation import GenerationSettings
    from ..prompts import TASKS
    from .protocol import ask_request_from_json

    if not isinstance(body, dict):
        raise HTTPError(400, "the ask body must be a JSON object")
    unknown(body, ASK_FIELDS, "ask")
    task = body.get("task")
    if task is not None and task not in TASKS:
        raise HTTPError(400, f"unknown task {str(task)[:40]!r}; known: {', '.join(TASKS)}")
    images, pins = [], []
    for k, item in enumerate(body.get("images") or []):
        if not isinstance(item, dict):
            raise HTTPError(400, "each image is {\"id\": ...} of an upload (POST /v1/images); paths are not accepted")
        unknown(item, IMAGE_FIELDS, "image")
        geometry = store.geometry(str(item.get("id")))
        if geometry is None:
            raise HTTPError(404, f"unknown image id {str(item.get('id'))[:80]!r}: upload it first (POST {API}/images)")
        pins.append(item["id"])
        images.append({"array": str(store.voxels_path(item["id"])), "ijk_to_ras": geometry["ijk_to_ras"],
                       "name": f"image {k + 1}", "role": item.get("role") or ("current" if k == 0 else "prior"),
                       "window": item.get("window"), "modality": item.get("modality")})
    if not images:
        raise HTTPError(400, "no image given: upload the scan (POST /v1/images) and list its id in 'images'")
    regions = []
    for item in body.get("regions") or []:
        if not isinstance(item, dict):
            raise HTTPError(400, "each region is an object with box_ras, box_ijk or mask_id")
        unknown(item, REGION_FIELDS, "region")
        region = {k: v for k, v in item.items() if k != "mask_id"}
        if item.get("mask_id") is not None:
            if store.geometry(str(item["mask_id"])) is None:
                raise HTTPError(404, f"unknown mask id {str(item['mask_id'])[:80]!r}: upload it first")
            pins.append(item["mask_id"])
            region["mask"] = str(store.voxels_path(item["mask_id"]))
        regions.append(region)
    settings = body.get("settings") or {}
    if not isinstance(settings, dict):
        raise HTTPError(400, "'settings' must be an object")
    unknown(settings, SETTINGS_FIELDS, "settings")
    try:
        GenerationSettings(**settings)
    except (RadFMError, TypeError) as exc:
        raise HTTPError(400, str(exc)) from None
    previous = body.get("previous_turns")
    check_previous_turns(previous)
    params = {"task": task, "question": body.get("question"), "images": images, "regions": regions,
              "history": body.get("history"), "window": body.get("window"), "interpolation": body.get("interpolation"),
              "include_previous_turns": bool(previous), "previous_turns": previous, **settings}
    try:  # what the worker would refuse (a role, a window, a region's numbers) is a 400 too, not an error mid-stream
        validate(ask_request_from_json(params))
    except RadFMError as exc:
        raise HTTPError(400, str(exc)) from None
    return params, pins


def check_previous_turns(previous) -> None:
    """Earlier turns as the prompt takes them (the question and history are checked with the rest of the
    ask): a 400 naming the turn, not an error after the stream has started."""
    from ..errors import PromptError
    from ..prompts import check_user_text

    if previous is None:
        return
    if not (isinstance(previous, list) and all(isinstance(t, list) and len(t) == 2 for t in previous)):
        raise HTTPError(400, "'previous_turns' is a list of [question, answer] pairs")
    try:
        for n, (question, answer) in enumerate(previous, 1):
            check_user_text(question, f"'previous_turns' question {n}")
            check_user_text(answer, f"'previous_turns' answer {n}")
    except PromptError as exc:
        raise HTTPError(400, str(exc)) from None


def unknown(item: dict, known: set, what: str) -> None:
    extra = set(item) - known
    if extra:
        hint = " (the server never reads a path a client names: upload the image)" if extra & {"path", "array", "mask"} else ""
        raise HTTPError(400, f"unknown {what} field(s) {sorted(extra)}; known: {sorted(known)}{hint}")


def create_app(config: ServeConfig, worker_factory=None):
    """The FastAPI app; the worker (and its model) lives as long as the app's lifespan."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = (worker_factory or WorkerClient.start)()
        worker.preview_dir = None  # no thumbnails on the server: nothing of a scan outside the upload cache
        store = ImageStore(config.cache_dir, int(config.cache_mb * 2**20), int(config.max_upload_mb * 2**20))
        try:
            try:
                app.state.model = await asyncio.to_thread(
                    worker.load, config.checkpoint, config.device, config.dtype, config.quantization,
                    vllm_url=config.vllm_url)
            except WorkerError as exc:  # one line for the person starting the server, then stop
                app.state.startup_error = str(exc)
                if getattr(app.state, "uvicorn", None) is not None:
                    app.state.uvicorn.should_exit = True
                yield
                return
            app.state.worker, app.state.store = worker, store
            app.state.scheduler = Scheduler(worker, store, config.queue_limit, config.answers_at_once)
            task = asyncio.create_task(app.state.scheduler.run())
            yield
            task.cancel()
        finally:
            await asyncio.to_thread(worker.close)
            store.close()

    app = FastAPI(title="RadFM server", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(HTTPError)
    async def refused(request: Request, exc: HTTPError):
        return JSONResponse({"detail": exc.detail}, exc.status, headers=exc.headers)

    def authorise(request: Request) -> None:
        if config.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), config.token.encode()):
            raise HTTPError(401, "unauthorized", {"WWW-Authenticate": "Bearer"})

    def client_key(request: Request) -> str:
        return request.headers.get(CLIENT_HEADER, "")[:64] or (request.client.host if request.client else "?")

    @app.get(API + "/health")
    async def health():
        return {"status": "ok", "tls": config.tls, "token_required": config.token is not None}

    @app.get(API + "/model")
    async def model(request: Request):
        import psutil

        authorise(request)
        try:
            status = await asyncio.to_thread(app.state.worker.status, 30)
        except Exception as exc:
            raise HTTPError(503, f"the model worker does not answer ({exc}); it restarts on the next question")
        described = dict(status.get("model") or {})
        described.pop("checkpoint", None)  # the server's folder layout is not the client's business
        return {"loaded": status.get("loaded"), "busy": status.get("busy"), "model": described,
                "memory": {**status.get("memory", {}),
                           "free_ram_mb": round(psutil.virtual_memory().available / 2**20, 1)},
                "pid": status.get("pid"), "queue": len(app.state.scheduler.queue), "queue_limit": config.queue_limit,
                "answering": len(app.state.scheduler.running), "answers_at_once": config.answers_at_once}

    @app.get(API + "/images/{upload_id}")
    async def has_image(upload_id: str, request: Request):
        authorise(request)
        if app.state.store.geometry(upload_id) is None:
            raise HTTPError(404, "not on this server")
        return {"id": upload_id}

    @app.post(API + "/images")
    async def upload(request: Request):
        authorise(request)
        store = app.state.store
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > store.max_upload:
            raise HTTPError(413, f"the upload is larger than {store.max_upload / 2**20:g} MB (the server's --max-upload-mb)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > store.max_upload:
                raise HTTPError(413, f"the upload is larger than {store.max_upload / 2**20:g} MB")
            chunks.append(chunk)
        return {"id": await asyncio.to_thread(store.put, b"".join(chunks))}

    @app.post(API + "/ask")
    async def ask(request: Request):
        authorise(request)
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise HTTPError(400, "malformed JSON in the ask body") from None
        except RecursionError:  # the parser recurses once per level: [[[[...]]]] 100,000 deep
            raise HTTPError(400, "the ask body is nested too deeply to be an ask (a JSON object of fields)") from None
        params, pins = worker_params(body, app.state.store)
        scheduler = app.state.scheduler
        job, ahead = scheduler.submit(client_key(request), params, pins)

        async def stream():
            try:
                yield sse(Event("status", f"queued, {ahead} ahead", {"ask_id": job.id, "ahead": ahead}))
                while True:
                    event = await job.events.get()
                    yield sse(event)
                    if event.final:
                        return
            finally:
                scheduler.cancel(job)  # the client went away (or the answer ended): stop the work

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.post(API + "/asks/{ask_id}/cancel")
    async def cancel(ask_id: str, request: Request):
        authorise(request)
        job = app.state.scheduler.asks.get(ask_id)
        if job is None:
            raise HTTPError(404, f"no running or queued ask {ask_id[:40]!r}")
        app.state.scheduler.cancel(job)
        return {"cancelled": ask_id}

    return app


def serve(config: ServeConfig) -> None:
    """Run the server until interrupted (uvicorn)."""
    import uvicorn

    config.check()
    scheme = "https" if config.tls else "http"
    print(f"RadFM server on {scheme}://{config.host}:{config.port}{API} (TLS {'on' if config.tls else 'off'}, "
          f"token {'required' if config.token else 'not required: loopback only'}); loading {config.checkpoint} ...",
          flush=True)
    app = create_app(config)
    app.state.uvicorn = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile,
        log_level="warning", access_log=False))
    app.state.uvicorn.run()
    if getattr(app.state, "startup_error", None):
        raise RadFMError(f"the model did not load, so nothing is served: {app.state.startup_error}")
