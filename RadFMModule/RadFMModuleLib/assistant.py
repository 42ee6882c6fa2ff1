"""What sits between the scene and the worker, shared by the chat panel and the module Logic.

* ``Scene`` (protocol): what the assistant needs from the viewer. In Slicer it is
  ``scene_adapters.SlicerScene``; in tests a plain Python object.
* ``Assistant``: turns a selection (volumes, regions, window, history) into the worker's
  ``ask`` arguments, writing big arrays to ``.npy`` files (they never travel in JSON);
  starts, loads and restarts the worker; keeps the conversation and saves it in the scene.

No Qt and no MRML here: ``build_ask`` reads the scene (call it on the GUI thread),
``connect`` may block for minutes (the panel runs it on a thread through ``ConnectJob``).
"""

import os
import queue
import shutil
import tempfile
import threading
import weakref
from collections import namedtuple
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from RadFMSlicer.errors import DeviceMemoryError, RadFMError

from .settings import RUN_SERVER, ModelSettings, load_token, precision_for_tiers

MEMORY_FOLDER = "/dev/shm"  # Linux: RAM-backed, so handing a scan to the worker writes nothing to disk
TASK_TOKENS = {"report": 512, "rationale": 384, "vqa": 256, "diagnosis": 256, "modality": 32}
WINDOW_AS_SHOWN = "view"  # use each volume's current window/level from the viewer
PREPARE_AHEAD_TIMEOUT_S = 600  # a scan encoded ahead on the CPU can take minutes

# Shaped like the worker's events so the panel handles connection and answer alike.
Note = namedtuple("Note", "kind text data", defaults=("", None))


@dataclass
class VolumeData:
    name: str
    array: np.ndarray  # [k, j, i], as slicer.util.arrayFromVolume gives it
    ijk_to_ras: np.ndarray  # 4x4, world (RAS) coordinates
    window: tuple | None  # (center, width) the viewer shows now
    version: str = ""  # changes whenever voxels or geometry change
    dicom_files: tuple = ()  # the DICOM files it was loaded from, if any: what a DICOM report of it cites


@dataclass(frozen=True)
class SceneItem:
    id: str
    name: str
    kind: str  # "volume", "segment", "box", "line" or "conversation"
    detail: str = ""  # e.g. "23.4 mm" for a line


class Scene(Protocol):
    def volumes(self) -> list: ...  # SceneItem list
    def regions(self) -> list: ...  # SceneItem list: segments, boxes and lines
    def shown_volume_id(self) -> "str | None": ...
    def volume(self, volume_id: str) -> VolumeData: ...
    def segment_mask(self, segment_id: str, volume_id: str) -> np.ndarray: ...  # on the volume's grid
    def box_ras(self, box_id: str) -> list: ...  # [[x0, y0, z0], [x1, y1, z1]]
    def line_length_mm(self, line_id: str) -> float: ...
    conversation_id: "str | None"  # which of the scene's conversations is shown and added to
    def conversations(self) -> list: ...  # SceneItem list, detail: how many answers
    def load_session_json(self) -> "str | None": ...
    def save_session_json(self, text: str) -> None: ...
    def set_aside_session_json(self) -> str: ...  # keeps an unreadable conversation; returns where
    def load_previews(self) -> dict: ...  # thumbnail file name -> PNG bytes, saved with the scene
    def save_previews(self, previews: dict) -> None: ...
    def load_scan(self, path: str) -> str: ...  # a scan file into the scene, shown; returns its volume id
    def show_overlay(self, scan_id: str, array: np.ndarray, name: str) -> str: ...  # heat map over the scan; node id
    def import_dicom(self, path: str) -> bool: ...  # a DICOM file into the application's DICOM database, if any


@dataclass
class Selection:
    """What the radiologist picked in the panel (or passed to the Logic)."""

    volume_id: str | None = None
    prior_id: str | None = None
    region_ids: tuple = ()
    window: object = WINDOW_AS_SHOWN  # WINDOW_AS_SHOWN, a preset name, or None (automatic)
    history: str = ""
    attention: bool = False  # also compute where the model looked (resampler attention) with the answer


def start_remote_client(url, token):
    from RadFMSlicer.remote import RemoteClient  # same methods and events as a WorkerClient

    return RemoteClient(url, token)


def start_worker_client(python):
    from RadFMSlicer.worker.client import WorkerClient  # imported on first use: keeps module import light

    return WorkerClient.start(python=python)


class Assistant:
    def __init__(self, scene: Scene, start_client=start_worker_client, settings: ModelSettings | None = None):
        self.scene = scene
        self.settings = settings or ModelSettings()
        self.start_client = start_client  # python path or None -> a started WorkerClient
        self.client = None
        self._loaded = None  # the settings the client was loaded with
        self._closed = False
        self._connecting = threading.Lock()  # one start/load at a time, whoever asks
        self._session = None
        self._files = tempfile.mkdtemp(prefix="radfm-slicer-")  # goes on close(), when dropped, or at exit
        self._forget_files = weakref.finalize(self, shutil.rmtree, self._files, ignore_errors=True)
        self._volume_files = {}  # volume id -> (version, .npy path)
        self._asked_volume = None  # the scan of the last build_ask: an answer's attention map goes over it
        self._memory = None  # our folder in MEMORY_FOLDER, made on the first hand-over that fits there
        self._stale = set()  # replaced hand-overs not removed yet (Windows: the worker still maps them)
        self._previews = os.path.join(self._files, "previews")  # thumbnails of this conversation only
        os.mkdir(self._previews)
        self._preview_bytes = {}  # file name -> PNG bytes, what the scene saves
        self.restore_note = ""  # after restore(): what the radiologist should know about it
        self.on_worker_line = None  # gets each line the worker writes on stderr (any thread)
        self._prepared = None  # (images, window) the running model was last sent (a question or prepare_ahead)
        self._ahead_sent = threading.Event()  # set unless a prepare_ahead is still handing its images over
        self._ahead_sent.set()

    # ------------------------------------------------------------------ inputs
    def build_ask(self, task: str, question: str, selection: Selection) -> dict:
        """Keyword arguments for ``WorkerClient.ask``; reads the scene, writes ``.npy`` files."""
        if not selection.volume_id:
            raise ValueError("Choose the scan to ask about (no volume is selected).")
        if question.strip() == "" and task == "vqa":
            raise ValueError("Type a question first.")
        if self.settings.run_on == RUN_SERVER:
            if not self.settings.server_url:
                raise ValueError("Enter the RadFM server's address in Model settings first.")
        elif not self.settings.checkpoint_folder:
            raise ValueError("Choose the RadFM checkpoint folder in Model settings first.")
        if selection.attention and self.settings.run_on == RUN_SERVER:
            raise ValueError("Showing where the model looked needs the model on this computer (Run on).")
        images, window = self._images(selection)
        known = {item.id: item for item in self.scene.regions()}
        regions, lengths = [], []
        for region_id in selection.region_ids:
            item = known.get(region_id)
            if item is None:
                raise ValueError("A selected region is no longer in the scene; pick the regions again.")
            if item.kind == "segment":
                mask = np.asarray(self.scene.segment_mask(region_id, selection.volume_id)).astype(np.uint8)
                if not mask.any():
                    raise ValueError(f"Segment {item.name!r} is empty on {images[0]['name']}'s grid.")
                path = self._new_file("mask")
                np.save(path, mask)
                regions.append({"mask": path, "label": None, "name": item.name, "image": 0})
            elif item.kind == "box":
                regions.append({"box_ras": self.scene.box_ras(region_id), "name": item.name, "image": 0})
            elif item.kind == "line":
                lengths.append(f"{item.name} {self.scene.line_length_mm(region_id):.1f} mm")
        history = selection.history.strip()
        if lengths:
            history = "; ".join(filter(None, [history, "Measured: " + ", ".join(lengths)]))
        self._asked_volume = selection.volume_id
        ask = {
            "task": task,
            "question": question.strip(),
            "images": images,
            "regions": regions,
            "history": history or None,
            "window": window,
            "max_new_tokens": TASK_TOKENS.get(task, 256),
        }
        if selection.attention:
            ask["attention"] = True
        self._prepared = repr(images), window  # this question sends them: nothing to prepare after it
        return ask

    def prepare_ahead(self, selection: Selection) -> "threading.Thread | None":
        """Have the running model read and encode the chosen scan (and prior) now, while the
        radiologist types: the first question about them then starts as a follow-up does.

        Reads the scene (GUI thread) and hands the volumes over as ``build_ask`` would, so the
        question reuses the same files; sending and waiting run on a thread (a server upload
        takes a while), which is returned. None when there is nothing to do: no model running
        yet (the first question starts it), no scan chosen, or these images were sent last.
        A failure goes to the log only: the question itself reports it properly.
        """
        client = self.client
        if client is None or self._closed or not selection.volume_id or not client.alive():
            return None
        images, window = self._images(selection)
        if (repr(images), window) == self._prepared:
            return None
        self._prepared = repr(images), window
        self._ahead_sent.clear()
        thread = threading.Thread(target=self._send_ahead, args=(client, images, window), daemon=True,
                                  name="radfm-prepare-ahead")
        thread.start()
        return thread

    def _send_ahead(self, client, images, window):
        names = ", ".join(item["name"] for item in images)
        try:
            request = client.encode(images, window)
            self._ahead_sent.set()  # the question may go now: it queues behind this encode, or finds it uploaded
            event = request.wait(PREPARE_AHEAD_TIMEOUT_S)
            text = event.text if event.kind == "error" else ""
        except Exception as exc:  # the worker stopped or the server went away: the question will restart it
            text = str(exc) or type(exc).__name__
        finally:
            self._ahead_sent.set()
        if text:
            self._prepared = None
        report = self.on_worker_line
        if report:
            report(f"Preparing {names} ahead of the question failed: {text}" if text
                   else f"{names} prepared ahead of the question")

    def _images(self, selection: Selection) -> tuple:
        """The ``images`` of an ask about this selection (handed over once per change of a node)
        and its request-wide window."""
        as_shown = selection.window == WINDOW_AS_SHOWN
        images = [self._image(selection.volume_id, "current", as_shown)]
        if selection.prior_id and selection.prior_id != selection.volume_id:
            images.append(self._image(selection.prior_id, "prior", as_shown))
        return images, None if as_shown else selection.window

    def _image(self, volume_id: str, role: str, as_shown: bool) -> dict:
        data = self.scene.volume(volume_id)
        version, path = self._volume_files.get(volume_id, (None, None))
        if version != data.version or not data.version:
            if path is not None:
                self._stale.add(path)  # replaced: the worker is handed the new file from now on
            path = self._hand_over(np.ascontiguousarray(data.array))
            self._volume_files[volume_id] = (data.version, path)
            self._remove_stale()
        # "center,width": the spelling every window parser in RadFMSlicer accepts for one image.
        window = f"{float(data.window[0])!r},{float(data.window[1])!r}" if (as_shown and data.window) else None
        return {"array": path, "ijk_to_ras": np.asarray(data.ijk_to_ras, float).tolist(),
                "name": data.name, "window": window, "role": role, "dicom_files": list(data.dicom_files) or None}

    def _new_file(self, stem: str, folder: str | None = None) -> str:
        fd, path = tempfile.mkstemp(prefix=stem + "-", suffix=".npy", dir=folder or self._files)
        os.close(fd)
        return path

    def _hand_over(self, array: np.ndarray) -> str:
        """A volume's ``.npy`` for the worker (which maps it, reading in place): in memory
        (MEMORY_FOLDER) when that is present with room for it twice over, else the temp folder."""
        try:
            if shutil.disk_usage(MEMORY_FOLDER).free > 2 * array.nbytes:
                if self._memory is None:  # RAM until removed: also when dropped without close() or at exit
                    self._memory = tempfile.mkdtemp(prefix="radfm-slicer-", dir=MEMORY_FOLDER)
                    self._forget_memory = weakref.finalize(self, shutil.rmtree, self._memory, ignore_errors=True)
                path = self._new_file("volume", self._memory)
                try:
                    np.save(path, array)
                    return path
                except OSError:  # filled up meanwhile
                    os.remove(path)
        except OSError:  # no such folder (macOS, Windows)
            pass
        path = self._new_file("volume")
        np.save(path, array)
        return path

    def _remove_stale(self):
        for path in list(self._stale):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            except OSError:  # Windows: still mapped by the worker; tried again at the next hand-over
                continue
            self._stale.discard(path)

    # ------------------------------------------------------------------ worker
    def connect(self, report=lambda text: None):
        """A worker loaded with the current settings: reused, or (re)started. Blocks."""
        self._ahead_sent.wait(PREPARE_AHEAD_TIMEOUT_S)  # a scan still uploading ahead is not uploaded twice
        with self._connecting:
            return self._connect(report)

    def _connect(self, report):
        wanted = (self.settings.run_on, self.settings.server_url, self.settings.worker_python,
                  self.settings.checkpoint_folder, tuple(self.settings.load_args().items()))
        if self.client is not None:
            if self._loaded == wanted and self.client.alive():  # a local check, no round trip to the worker
                return self.client
            self._drop_client()
        if self.settings.run_on == RUN_SERVER:
            url = self.settings.server_url
            report(f"Connecting to the RadFM server at {url}…")
            self.client = start_remote_client(url, load_token(url))
            self.client.load()  # checks that the server answers, accepts the token and has its model
            self._loaded = wanted
            return self.client
        report("Starting the model worker…")
        self.client = self.start_client(self.settings.worker_python or None)
        self.client.on_stderr = self.on_worker_line
        if self._closed:
            self._drop_client()
            raise RuntimeError("The RadFM panel was closed.")
        args = self.settings.load_args()
        report(f"Loading the model on {args['device']} ({self.settings.precision}); this can take a few minutes…")
        self.client.load(self.settings.checkpoint_folder, **args)
        self._loaded = wanted
        return self.client

    def _drop_client(self):
        client, self.client, self._loaded, self._prepared = self.client, None, None, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    # ------------------------------------------------------------------ conversation
    @property
    def session(self):
        if self._session is None:
            self._session = self._new_session()
        return self._session

    @staticmethod
    def _new_session(text: str | None = None):
        from RadFMSlicer.session import Session  # imported on first use: keeps module import light

        return Session.from_json(text) if text else Session()

    def record(self, turn):
        """Add a finished turn (dict or Turn) and save the conversation, thumbnails included, in the scene."""
        turn = self.session.add_turn(turn)
        for image in turn.images:
            self._keep_preview(image)
        self._keep_attention(turn)
        self.scene.save_previews(self._preview_bytes)  # exactly the recorded turns' thumbnails (restore trims)
        self.scene.save_session_json(self.session.to_json())
        return turn

    def last_answer(self):
        """The latest turn with an answer (the draft a reader exports), or None."""
        answered = [turn for turn in (self._session.turns if self._session else []) if turn.answer and not turn.error]
        return answered[-1] if answered else None

    def export_sr(self, path: str, text: "str | None" = None, kind: str = "comprehensive3d") -> str:
        """The last answer as a DICOM SR at ``path``, with the reader's edit ``text`` (kept in the
        conversation beside the model's words); imported into the DICOM database where there is one.
        Returns what to tell the user; a problem raises RadFMError."""
        try:
            from RadFMSlicer import dicom_report
        except ModuleNotFoundError as exc:  # an extra ("record"), not among the packages the panel installs
            raise ValueError(f"DICOM SR export needs {exc.name} in this Python: install it (in Slicer's Python "
                             "console: slicer.util.pip_install('highdicom')), then export again.") from None

        turn = self.last_answer()
        if turn is None:
            raise ValueError("No answer to export yet: ask first.")
        if text is not None and text != turn.text:
            turn.edit(text)
            self.scene.save_session_json(self.session.to_json())
        dicom_report.write(dicom_report.structured_report(turn, kind=kind), path)
        edited = ", edited by the reader" if turn.edited else ""
        where = " and added to the DICOM database" if self.scene.import_dicom(path) else ""
        return f"Draft saved as DICOM SR {os.path.basename(path)} (unverified{edited}){where}"

    def restore(self) -> list:
        """Reload the conversation saved in the scene (if any); returns its turns.

        A conversation that cannot be read is set aside in the scene, untouched, and
        ``restore_note`` says so; a new conversation starts.
        """
        text, self.restore_note = self.scene.load_session_json(), ""
        try:
            self._session = self._new_session(text) if text else None
        except RadFMError as exc:
            self._session = None
            kept = self.scene.set_aside_session_json()
            self.restore_note = (f"The conversation saved in this scene could not be read ({exc}); it is kept "
                                 f"unchanged in the text node \"{kept}\" and a new conversation starts.")
        self._restore_previews()
        return self._session.turns if self._session else []

    # ------------------------------------------------------------------ thumbnails
    def _keep_preview(self, image):
        """Move a turn's thumbnail from the worker's folder into ours (its name is unique) and remember it."""
        source = image.preview_png
        if not source or not os.path.isfile(source):
            return
        kept = _move_into(source, self._previews)
        with open(kept, "rb") as f:
            self._preview_bytes[os.path.basename(kept)] = f.read()
        image.preview_png = kept

    def _keep_attention(self, turn):
        """Move a turn's attention map from the worker's folder into ours and note the scan it was
        asked about (the last ``build_ask``'s). Kept while Slicer runs, not in the scene (a float per voxel)."""
        info = turn.provenance.get("attention")
        if not info or not os.path.isfile(info.get("file") or ""):
            return
        info.update(file=_move_into(info["file"], self._files), volume_id=self._asked_volume)

    def show_attention(self, turn) -> str:
        """Show a turn's attention map over its scan (``Scene.show_overlay``); returns the overlay's name."""
        from RadFMSlicer.attention import LABEL  # numpy only

        info = turn.provenance.get("attention") or {}
        if not (info.get("volume_id") and os.path.isfile(info.get("file") or "")):
            raise ValueError("This answer's attention map is gone (maps are kept while Slicer runs); "
                             "tick \u201cShow where the model looked\u201d and ask again.")
        name = f"{turn.images[0].label} \u2014 {LABEL}"
        self.scene.show_overlay(info["volume_id"], np.load(info["file"], allow_pickle=False), name)
        return name

    def _restore_previews(self):
        """Write the scene's thumbnails to our folder, point the turns at them, delete the rest."""
        self._preview_bytes = dict(self.scene.load_previews())
        referenced = set()
        for turn in (self._session.turns if self._session else []):
            for image in turn.images:
                name = os.path.basename(image.preview_png or "")
                if name in self._preview_bytes:
                    image.preview_png = os.path.join(self._previews, name)
                    referenced.add(name)
                    with open(image.preview_png, "wb") as f:
                        f.write(self._preview_bytes[name])
                elif image.preview_png and not os.path.isfile(image.preview_png):
                    image.preview_png = None  # saved without its picture: show none rather than a stale path
        for name in set(os.listdir(self._previews)) - referenced:
            os.remove(os.path.join(self._previews, name))
        self._preview_bytes = {name: self._preview_bytes[name] for name in referenced}

    def close(self):
        self._closed = True
        self._drop_client()
        self._forget_files()
        if self._memory:
            self._forget_memory()


def _move_into(source: str, folder: str) -> str:
    """Where ``source`` (a file the worker wrote, its name unique) is once moved into ``folder``;
    a file already there stays."""
    kept = os.path.join(folder, os.path.basename(source))
    if os.path.abspath(source) != kept:
        shutil.move(source, kept)
    return kept


class ConnectJob:
    """``Assistant.connect`` on a background thread; ``poll()`` like a worker request."""

    def __init__(self, assistant: Assistant):
        self._events = queue.Queue()
        self._cancelled = False
        threading.Thread(target=self._run, args=(assistant,), daemon=True, name="radfm-connect").start()

    def _run(self, assistant):
        try:
            assistant.connect(lambda text: self._events.put(Note("status", text)))
            self._events.put(Note("ready"))
        except Exception as exc:  # WorkerError, a bad Python path, a missing folder...
            text = str(exc) or type(exc).__name__
            fits = precision_for_tiers(DeviceMemoryError.tiers_in(text))  # the GPU check named what fits
            self._events.put(Note("error", text, {"precision": fits} if fits else None))

    def poll(self) -> list:
        if self._cancelled:
            return []
        events = []
        while not self._events.empty():
            events.append(self._events.get_nowait())
        return events

    def cancel(self):
        """Stop reporting; a load in progress finishes and the worker is kept for next time."""
        self._cancelled = True
