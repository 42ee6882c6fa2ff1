"""Files we write under faults: kill -9 mid-write, a file-size limit, a full disk, two writers at once."""

import errno
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest

from RadFMSlicer import storage
from RadFMSlicer.errors import RadFMError
from RadFMSlicer.session import Session, Turn, append_turn

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def big_session(path, turns=800, answer_chars=4000):
    session = Session(turns=[Turn(task="vqa", question=f"question {n}?", answer="x" * answer_chars)
                             for n in range(turns)])
    session.write(path)
    return path.read_bytes()


def run_python(code, **kwargs):
    env = {**os.environ, "PYTHONPATH": PROJECT}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


KILLED_WHILE_WRITING = """
import builtins, io, os, signal
from RadFMSlicer.session import Turn, append_turn

def kill_once_open(opener):
    def open_then_die(file, mode="r", *args, **kwargs):
        handle = opener(file, mode, *args, **kwargs)
        writing = (mode & (os.O_WRONLY | os.O_RDWR)) if isinstance(mode, int) else any(c in mode for c in "wax+")
        if writing and str(file).startswith({folder!r}) and not str(file).endswith(".lock"):
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 the moment the file is open for writing
        return handle
    return open_then_die

builtins.open = io.open = kill_once_open(io.open)
os.open = kill_once_open(os.open)
append_turn({path!r}, Turn(task="vqa", question="one more?", answer="y" * 4000))
"""


def test_kill_9_while_a_session_is_written_keeps_the_old_session(tmp_path):
    """The fault: kill -9 during the write used to leave a 0-byte session (4 times of 4)."""
    path = tmp_path / "session.json"
    old = big_session(path)
    child = run_python(KILLED_WHILE_WRITING.format(folder=str(tmp_path), path=str(path)))
    child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == old


LIMITED_APPEND = """
import sys
from RadFMSlicer.errors import RadFMError
from RadFMSlicer.session import Turn, append_turn
try:
    append_turn({path!r}, Turn(task="vqa", question="one more?", answer="z" * 4000))
except RadFMError as exc:
    print(exc)
    sys.exit(1)
"""


def test_a_file_size_limit_keeps_the_old_session_and_says_so(tmp_path):
    path = tmp_path / "session.json"
    old = big_session(path)
    limit = len(old) // 2

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    child = run_python(LIMITED_APPEND.format(path=str(path)), preexec_fn=limit_file_size)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 1, err
    assert "could not write" in out and str(path) in out and "previous version is kept unchanged" in out
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["session.json"]


def test_a_killed_writers_leftovers_go_and_a_running_writers_stay(tmp_path):
    """Two programs fetching one series into one cache: the second clears what a killed fetch left, never the
    temporary file the first is writing at that moment (before, it deleted it and the first failed to rename)."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(gone.stdout), os.getpid()
    for name in (f".a.dcm.{dead}-0f0f.tmp", f".b.dcm.{alive}-0f0f.tmp", ".c.dcm.tmp", "d.dcm"):
        (tmp_path / name).write_bytes(b"DICM")
    storage.remove_abandoned(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".b.dcm.{alive}-0f0f.tmp", "d.dcm"]


def test_a_full_disk_keeps_the_old_file_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    storage.write_text(path, "the old report")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.os, "fsync", disk_full)
    with pytest.raises(storage.StorageError, match="No space left on device.*previous version is kept unchanged"):
        storage.write_text(path, "the new report" * 1000)
    assert path.read_text() == "the old report"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(storage.StorageError, match="folder .*nowhere does not exist"):
        storage.write_text(tmp_path / "nowhere" / "s.json", "{}")


def test_two_programs_adding_to_one_session_keep_both_turns(tmp_path, monkeypatch):
    """The fault: two concurrent ``radfm ask --session F`` lost a turn (a slow read widens the race)."""
    path = tmp_path / "session.json"
    Session().write(path)
    parse = Session.from_bytes.__func__

    def slow_parse(cls, data, where):
        time.sleep(0.3)
        return parse(cls, data, where)

    monkeypatch.setattr(Session, "from_bytes", classmethod(slow_parse))
    threads = [threading.Thread(target=append_turn, args=(path, Turn(task="vqa", question=f"q{n}?", answer="a")))
               for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(t.question for t in Session.read(path).turns) == ["q0?", "q1?", "q2?"]


def test_a_writer_waits_for_the_lock_and_then_says_who_holds_it(tmp_path):
    path = tmp_path / "session.json"
    with storage.lock(path):
        with pytest.raises(storage.StorageError, match="another program is writing"):
            storage.write_text(path, "{}", timeout=0.2)
    assert not path.exists()


def test_a_corrupt_session_is_refused_and_left_as_it_was(tmp_path):
    path = tmp_path / "session.json"
    path.write_bytes(b'{"format": 1, "turns": [\xff')
    with pytest.raises(RadFMError, match="not a RadFM session file.*left as it was"):
        append_turn(path, Turn(task="vqa", question="q?"))
    assert path.read_bytes() == b'{"format": 1, "turns": [\xff'
