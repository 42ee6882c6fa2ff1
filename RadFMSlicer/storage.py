"""Every file RadFMSlicer writes whole goes through here: atomically, one writer at a time.

A file is never rewritten in place. The new content goes to a temporary file in the same
folder, is flushed to the disk (``fsync``) and then renamed over the old one
(``os.replace``, atomic on POSIX and Windows), so a kill at any moment leaves either the
old file or the new one, never a cut one. A failed write (full disk, file-size limit, no
permission) removes the temporary file, keeps the old file as it was and raises a
:class:`StorageError` saying so.

Writers of one file are serialised by a lock file beside it (``<name>.lock``, through the
``filelock`` package: it works across processes on Linux, macOS and Windows and frees the
lock when its holder dies). :func:`update` holds the lock around read, change and write,
so two programs adding to the same session both keep their turn.
"""

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

from .errors import RadFMError

LOCK_TIMEOUT_S = 120.0  # another writer of the same file holds the lock at most this long


class StorageError(RadFMError):
    """A file could not be written; the previous version is untouched."""


def lock(path, timeout: float = LOCK_TIMEOUT_S):
    """The inter-process lock of ``path`` (a ``filelock.FileLock``): ``with lock(path): ...``."""
    import filelock  # imported on first write: the Slicer panel imports this module before its packages exist

    path = Path(path)
    return filelock.FileLock(str(path.with_name(path.name + ".lock")), timeout=timeout)


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


def _replace(path: Path, data: bytes) -> None:
    kept = "the previous version is kept unchanged" if path.exists() else "nothing was written"
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
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
