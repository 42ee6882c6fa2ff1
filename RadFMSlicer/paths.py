"""What a path the user names may be: a regular file, or a folder where a folder is asked for.

A device, a FIFO (named pipe) or a socket is refused by name before anything opens it:
reading one may never end (``radfm batch --out /dev/full`` read the device while resuming
and grew to 15 GB of memory; ``--image`` a FIFO waited forever for a writer), and writing
one leaves no file to find again. A symlink is followed; a loop of them is named.
"""

import os
import stat

from .errors import RadFMError

FILE, FOLDER, EITHER = "file", "folder", "file or folder"

_ODD_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_kind(path, what: str, kind: str = EITHER) -> None:
    """Raise a RadFMError if ``path`` exists and is not a ``kind`` (FILE, FOLDER or EITHER).

    ``what`` names the path as the user gave it (``"--image"``, ``"session file"``). A path that
    does not exist passes: whether it must exist is its reader's or writer's business.
    """
    try:
        info = os.stat(path)  # follows symlinks: what would be opened
    except (FileNotFoundError, NotADirectoryError):  # not there (yet): its reader or writer says so
        return
    except OSError as exc:  # a symlink loop (ELOOP), a name too long, no permission to look
        raise RadFMError(f"{what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISREG(info.st_mode):
        if kind == FOLDER:
            raise RadFMError(f"{what} {path} is a file: give a folder")
        return
    if stat.S_ISDIR(info.st_mode):
        if kind == FILE:
            raise RadFMError(f"{what} {path} is a folder: give a file")
        return
    odd = next((name for test, name in _ODD_KINDS if test(info.st_mode)), "neither a regular file nor a folder")
    raise RadFMError(f"{what} {path} is {odd}: give a regular {kind}")


def split_npy_index(path) -> "tuple[str, int | None]":
    """``scan.npy#2`` -> (``scan.npy``, 2): the image of a RadFM ``.npy`` that holds several; else (path, None)."""
    head, sep, tail = str(path).rpartition("#")
    if sep and tail.isdigit() and head.lower().endswith(".npy"):
        return head, int(tail)
    return str(path), None
