"""Every file RadFMSlicer writes whole goes through here: atomically, one writer at a time.

A file is never rewritten in place. The new content goes to a temporary file in the same
folder, is flushed to the disk (``fsync``) and then renamed over the old one
(``os.replace``, atomic on POSIX and Windows), so a kill at any moment leaves either the
old file or the new one, never a cut one. A failed write (full disk, file-size limit, no
permission) removes the temporary file, keeps the old file as it was and raises a
:class:`StorageError` saying so.

Writers of one file are serialised by a lock (the ``filelock`` package: it works across
processes on Linux, macOS and Windows and frees the lock when its holder dies).
:func:`update` holds the lock around read, change and write, so two programs adding to the
same session both keep their turn. The lock files live in the user's own lock folder
(:func:`lock_folder`), named after the output's real path, so none is left beside the
user's files and two names of one file (a symlink) share one lock. A whole run writing one
output (``radfm batch``, ``radfm eval``) holds :func:`sole_writer`: a second run on the same
output is refused at once, naming the first.
"""

import contextlib
import hashlib
import os
import secrets
import stat
import tempfile
from pathlib import Path

from .errors import RadFMError
from .paths import FILE, check_kind

LOCK_TIMEOUT_S = 120.0  # another writer of the same file holds the lock at most this long
UNFINISHED = ".*.tmp"  # the temporary files of writes under way, or of writers killed mid-write


class StorageError(RadFMError):
    """A file could not be written; the previous version is untouched."""


def lock(path, timeout: float = LOCK_TIMEOUT_S):
    """The inter-process lock of ``path`` (a ``filelock.FileLock``): ``with lock(path): ...``."""
    import filelock  # imported on first write: the Slicer panel imports this module before its packages exist

    return filelock.FileLock(str(_lock_file(path, "write")), timeout=timeout)


def lock_folder() -> Path:
    """The folder of this user's lock files: ``$XDG_RUNTIME_DIR`` or the temporary folder, private to the user.

    Why not beside the output: a ``.lock`` file left next to every session, page and report is
    clutter in the user's folders. The price: two user accounts writing one shared file are
    not serialised (README: Limits).
    """
    uid = os.getuid() if hasattr(os, "getuid") else None  # Windows: the temporary folder is the user's own
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = runtime if runtime and os.path.isdir(runtime) else tempfile.gettempdir()
    folder = Path(base) / f"radfm-locks-{uid if uid is not None else 'user'}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(folder)
    except OSError as exc:
        raise StorageError(f"cannot make the lock folder {folder}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode) or (uid is not None and info.st_uid != uid):
        raise StorageError(f"the lock folder {folder} is not a folder of yours: remove it, or set XDG_RUNTIME_DIR "
                           f"to a private folder")
    return folder


def _lock_file(path, purpose: str) -> Path:
    """The lock file of ``path`` for ``purpose`` ("write" or "run"), keyed by its real path."""
    real = os.path.realpath(os.path.expanduser(os.fspath(path)))
    key = hashlib.sha256(f"{purpose}:{real}".encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return lock_folder() / f"{key}.{purpose}.lock"


@contextlib.contextmanager
def sole_writer(path, program: str):
    """Hold ``path`` for a whole run of ``program`` (``"radfm batch"``); a second run is refused at once.

    Why: two runs on one results file each answered every scan (double the work, for the same
    records). The holder's pid is kept beside its lock file, so the refusal names it.
    """
    import filelock

    lock_path = _lock_file(path, "run")
    holder = lock_path.with_suffix(".holder")
    run_lock = filelock.FileLock(str(lock_path), timeout=0)
    try:
        run_lock.acquire()
    except TimeoutError:  # filelock.Timeout
        try:
            who = holder.read_text().strip()
        except OSError:
            who = ""
        raise StorageError(f"another {who or program} is writing {path}; wait for it to end, or choose another "
                           f"--out") from None
    except OSError as exc:
        raise StorageError(f"cannot lock {lock_path}: {exc.strerror or exc}") from None
    try:
        holder.write_text(f"{program} (pid {os.getpid()})")
        yield
    finally:
        run_lock.release()


def write_bytes(path, data: bytes, timeout: float = LOCK_TIMEOUT_S) -> None:
    """Replace ``path`` by ``data`` atomically, under its lock."""
    with _locked(path, timeout):
        _replace(Path(path), data)


def write_once(path, data: bytes) -> None:
    """Write ``path`` atomically without a lock, for a file whose content never changes once written
    (a DICOM instance named by its UID): two writers write the same bytes, whichever rename wins."""
    _replace(Path(path), data)


def write_text(path, text: str, timeout: float = LOCK_TIMEOUT_S) -> None:
    write_bytes(path, text.encode("utf-8"), timeout)


def update(path, change, timeout: float = LOCK_TIMEOUT_S) -> bytes:
    """Read-modify-write under the lock: ``change(old bytes or None) -> new bytes``; returns them."""
    path = Path(path)
    with _locked(path, timeout):
        try:
            old = path.read_bytes()
        except FileNotFoundError:
            old = None
        new = change(old)
        _replace(path, new)
        return new


@contextlib.contextmanager
def _locked(path, timeout: float):
    path = Path(path)
    check_kind(path, "cannot write: output", FILE)  # never replace a device or FIFO by a file, nor read one
    if not path.parent.is_dir():
        raise StorageError(f"cannot write {path}: folder {path.parent} does not exist")
    file_lock = lock(path, timeout)
    try:
        file_lock.acquire()
    except TimeoutError as exc:  # filelock.Timeout
        raise StorageError(f"another program is writing {path} (its lock {file_lock.lock_file} was held "
                           f"for over {timeout:g} s); try again when it is done") from exc
    except OSError as exc:
        raise StorageError(f"cannot lock {file_lock.lock_file}: {exc.strerror or exc}") from exc
    try:
        yield
    finally:
        file_lock.release()


def remove_abandoned(folder) -> None:
    """Delete the temporary files in ``folder`` whose writer is gone (killed mid-write); those of a writer
    still running (another process fetching into the same cache) are left to it."""
    for part in Path(folder).glob(UNFINISHED):
        writer = part.name.rsplit(".", 2)[-2].split("-", 1)[0]  # .<name>.<pid>-<random>.tmp
        if not (writer.isdigit() and process_exists(int(writer))):
            part.unlink(missing_ok=True)


def process_exists(pid: int) -> bool:
    """Whether a process with this id runs; without psutil on POSIX (a worker's Python in Slicer may lack it)."""
    if os.name == "nt":
        import psutil

        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _replace(path: Path, data: bytes) -> None:
    kept = "the previous version is kept unchanged" if path.exists() else "nothing was written"
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")  # see remove_abandoned
    fd = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            fd = None
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except OSError as exc:
        if fd is not None:
            os.close(fd)
        _remove(tmp)
        raise StorageError(f"could not write {path} ({exc.strerror or exc}, {len(data):,} bytes); {kept}") from exc


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX; Windows has no directory handles to sync)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(path, what: str, folder: bool = False) -> None:
    """Raise a StorageError now, before any long work, if ``path`` could not be written later.

    ``folder``: ``path`` is a folder to write files into (created if missing). A test file is
    made and removed in the target folder: only that catches read-only mounts and ``/proc``.
    """
    path = Path(path).expanduser()
    check_kind(path, what)  # a device or FIFO; a file for a folder (or back) is named just below
    if path.exists() and path.is_dir() != folder:
        raise StorageError(f"{what} {path} is a {'file' if folder else 'folder'}; give a "
                           f"{'folder' if folder else 'file name (inside it)'}")
    target = path if folder else path.parent
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise StorageError(f"cannot write {what} {path}: {existing} is a file, not a folder")
    try:
        if folder:
            target.mkdir(parents=True, exist_ok=True)
        elif not target.is_dir():
            raise StorageError(f"cannot write {what} {path}: folder {target} does not exist")
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as exc:
        raise StorageError(f"cannot write {what} {path}: {exc.strerror or exc} in {target}") from None
