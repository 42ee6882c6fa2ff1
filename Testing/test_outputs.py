"""Outputs and odd files: a full disk, a read-only folder, a device, a FIFO, a closed pipe, two runs on one output.

A full disk is played by a file-size limit (``RLIMIT_FSIZE``) on a child ``radfm``: the kernel
then fails every write past the limit (EFBIG) as a full disk fails it (ENOSPC), whoever writes
(Pillow, safetensors, json), with no root and no mount needed.
"""

import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pydicom.data
import pytest

from RadFMSlicer import storage
from RadFMSlicer.cli import main
from RadFMSlicer.convert import convert_checkpoint
from RadFMSlicer.errors import CheckpointError, RadFMError
from RadFMSlicer.session import Session, Turn, append_turn

CT = pydicom.data.get_testdata_file("CT_small.dcm")
PROJECT = Path(__file__).resolve().parent.parent
WAIT_S = 300  # generous: the machine may be loaded; a blocked read would never end


def radfm(*argv, file_limit=None, stdout=subprocess.PIPE, **kwargs):
    """``radfm ARGV`` in a child process (with at most ``file_limit`` bytes per file written)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([sys.executable, "-m", "RadFMSlicer.cli", *map(str, argv)], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=WAIT_S, cwd=PROJECT,
                          env={**os.environ, "PYTHONPATH": str(PROJECT)},
                          preexec_fn=limit if file_limit else None, **kwargs)


def last_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def manifest(tmp_path) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "c1", "images": [CT], "task": "modality", "reference": "CT"}) + "\n")
    return path


# --- full disks and read-only folders ----------------------------------------------------------
def test_eval_on_a_full_disk_is_one_line_and_the_rerun_completes(tmp_path, tiny_checkpoint):
    """Before, a preview that did not fit ended the run in a Pillow traceback, leaving a cut PNG."""
    run = ["eval", "--checkpoint", tiny_checkpoint, "--manifest", manifest(tmp_path), "--out", tmp_path / "run",
           "--max-new-tokens", 2]
    full = radfm(*run, file_limit=3000)
    assert full.returncode == 2 and last_line(full.stderr).startswith("radfm: error: could not write")
    assert not list((tmp_path / "run").rglob("*.tmp"))
    again = radfm(*run)
    assert again.returncode == 0, again.stderr
    record = json.loads((tmp_path / "run" / "cases.jsonl").read_text().splitlines()[-1])
    assert "answer" in record and (tmp_path / "run" / "index.html").is_file()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["cases.jsonl", "index.html", "previews",
                                                                     "summary.json"]


def test_eval_into_a_folder_that_cannot_be_written_is_one_line_before_the_model(capsys, tmp_path, tiny_checkpoint):
    code = main(["eval", "--checkpoint", str(tiny_checkpoint), "--manifest", str(manifest(tmp_path)),
                 "--out", "/sys/radfm-run"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write run folder (--out) /sys/radfm-run" in err and "Loading" not in err


def test_preview_on_a_full_disk_is_one_line_and_leaves_no_cut_png(tmp_path):
    out = tmp_path / "p.png"
    full = radfm("preview", "--image", CT, "--out", out, file_limit=2000)
    assert full.returncode == 2 and f"could not write {out}" in last_line(full.stderr)
    assert list(tmp_path.iterdir()) == []
    assert radfm("preview", "--image", CT, "--out", out).returncode == 0 and out.stat().st_size > 2000


def test_convert_checks_the_free_space_first_naming_what_it_needs(tmp_path, fixture_dir, monkeypatch):
    """Before, convert started on ~28 GB whatever the disk held, and left an empty folder when it failed."""
    import shutil

    from RadFMSlicer import convert

    monkeypatch.setattr(convert.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10**12, 10**12 - 5e6,
                                                                                              int(5e6)))
    with pytest.raises(CheckpointError, match=r"converting needs about \d+\.\d MB in .*, which has 5\.0 MB free"):
        convert_checkpoint(fixture_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_convert_into_a_folder_that_cannot_be_written_says_so_first(fixture_dir):
    with pytest.raises(CheckpointError, match=r"^cannot write the converted checkpoint in /sys: "):
        convert_checkpoint(fixture_dir, "/sys/radfm-bf16")


def test_convert_on_a_full_disk_leaves_nothing_and_the_rerun_completes(tmp_path, fixture_dir):
    out = tmp_path / "radfm-bf16"
    run = ["convert", "--checkpoint", fixture_dir, "--out", out, "--shard-size-gb", 0.004]
    full = radfm(*run, file_limit=2_000_000)
    assert full.returncode == 2
    assert f"could not write the converted checkpoint {out} (File too large)" in last_line(full.stderr)
    assert list(tmp_path.iterdir()) == []  # no half checkpoint, no hidden partial folder
    again = radfm(*run)
    assert again.returncode == 0, again.stderr
    assert len(list(out.glob("model-*.safetensors"))) >= 2 and (out / "radfm_manifest.json").is_file()


# --- devices, FIFOs, sockets, symlink loops ------------------------------------------------------
def test_batch_refuses_a_device_as_its_results_file(tmp_path, tiny_checkpoint):
    """Before, ``--out /dev/full`` was read while resuming: 15 GB of memory in 25 s (here: capped)."""
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "ct.dcm").write_bytes(Path(CT).read_bytes())

    def capped():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    done = subprocess.run([sys.executable, "-m", "RadFMSlicer.cli", "batch", "--checkpoint", str(tiny_checkpoint),
                           "--input", str(tmp_path / "scans"), "--out", "/dev/full"],
                          capture_output=True, text=True, timeout=WAIT_S, cwd=PROJECT, preexec_fn=capped,
                          env={**os.environ, "PYTHONPATH": str(PROJECT)})
    assert done.returncode == 2
    assert last_line(done.stderr) == ("radfm: error: --out /dev/full is a character device: give a regular file or "
                                      "folder")


@pytest.mark.parametrize("flag", ["image", "region", "manifest", "session", "token-file"])
def test_a_fifo_given_as_any_path_is_refused_instead_of_waited_on(tmp_path, tiny_checkpoint, flag):
    """Before, ``--image`` a FIFO waited forever for a writer."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    argv = {"image": ["preview", "--image", fifo, "--out", tmp_path / "p.png"],
            "region": ["preview", "--image", CT, "--region", fifo, "--out", tmp_path / "p.png"],
            "manifest": ["eval", "--checkpoint", tiny_checkpoint, "--manifest", fifo, "--out", tmp_path / "run"],
            "session": ["ask", "--checkpoint", tiny_checkpoint, "--image", CT, "--session", fifo],
            "token-file": ["ask", "--server", "http://127.0.0.1:9", "--token-file", fifo, "--image", CT]}[flag]
    done = radfm(*argv)
    assert done.returncode == 2 and "is a FIFO (named pipe)" in last_line(done.stderr) and str(fifo) in done.stderr


def test_a_socket_a_symlink_loop_and_a_folder_are_named(tmp_path):
    from RadFMSlicer.paths import FILE, FOLDER, check_kind

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    with pytest.raises(RadFMError, match="session file .*sock is a socket: give a regular file$"):
        check_kind(tmp_path / "sock", "session file", FILE)
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(RadFMError, match="loop: Too many levels of symbolic links"):
        check_kind(tmp_path / "loop", "--image")
    with pytest.raises(RadFMError, match="is a folder: give a file"):
        check_kind(tmp_path, "--session", FILE)
    check_kind(tmp_path, "--preview-dir", FOLDER)
    check_kind(tmp_path / "not-yet", "--out", FILE)  # a new output passes


def test_a_symlink_loop_as_the_scan_is_named_not_called_missing(capsys, tmp_path):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    assert main(["preview", "--image", str(tmp_path / "loop"), "--out", str(tmp_path / "p.png")]) == 2
    assert "Too many levels of symbolic links" in capsys.readouterr().err


def test_storage_never_replaces_a_fifo_or_device_by_a_file(tmp_path):
    """Before, a write replaced whatever the name held (as root, a device node) by a regular file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(RadFMError, match="fifo is a FIFO \\(named pipe\\): give a regular file$"):
        storage.write_text(fifo, "{}")
    assert fifo.is_fifo() and list(tmp_path.iterdir()) == [fifo]


# --- a closed stdout -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["text", "json"])
def test_the_session_keeps_the_turn_when_stdout_closes(tmp_path, tiny_checkpoint, mode):
    """``radfm ask --session s.json | head -c 5``: before, the turn was never saved and nothing said."""
    session = tmp_path / "s.json"
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first word
    try:
        done = radfm("ask", "--checkpoint", tiny_checkpoint, "--image", CT, "--max-new-tokens", 8,
                     "--session", session, *(["--json"] if mode == "json" else []), stdout=write)
    finally:
        os.close(write)
    assert done.returncode == 141
    assert last_line(done.stderr) == (f"radfm: stdout was closed before the whole answer was printed; "
                                      f"the turn was added to {session}")
    (turn,) = Session.read(session).turns
    assert turn.answer and turn.stop_reason == "length" and not turn.error


# --- two runs on one output; lock files -------------------------------------------------------------
HOLD = """
import sys
from RadFMSlicer import storage
with storage.sole_writer(sys.argv[1], sys.argv[2]):
    print("holding", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def another_run():
    """``another_run(out, "radfm batch")``: a process holding ``out`` as that run does, until the test ends."""
    children = []

    def hold(out, program):
        child = subprocess.Popen([sys.executable, "-c", HOLD, str(out), program], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(PROJECT)})
        children.append(child)
        assert child.stdout.readline() == "holding\n"
        return child

    yield hold
    for child in children:
        child.communicate(timeout=WAIT_S)


def test_a_second_batch_on_one_out_is_refused_naming_the_first(capsys, tmp_path, tiny_checkpoint, another_run):
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "ct.dcm").write_bytes(Path(CT).read_bytes())
    out = tmp_path / "reports.jsonl"
    argv = ["batch", "--checkpoint", str(tiny_checkpoint), "--input", str(tmp_path / "scans"), "--out", str(out),
            "--max-new-tokens", "2"]
    first = another_run(out, "radfm batch")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"radfm: error: another radfm batch (pid {first.pid}) is writing {out}; "
                                    f"wait for it to end, or choose another --out")
    assert "Loading" not in err and not out.exists()
    first.communicate(timeout=WAIT_S)
    assert main(argv) == 0 and len(out.read_text().splitlines()) == 1


def test_a_second_eval_on_one_run_folder_is_refused_naming_the_first(capsys, tmp_path, tiny_checkpoint, another_run):
    run = tmp_path / "run"
    first = another_run(run, "radfm eval")
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--manifest", str(manifest(tmp_path)),
                 "--out", str(run)]) == 2
    assert f"another radfm eval (pid {first.pid}) is writing {run}" in capsys.readouterr().err
    assert not (run / "cases.jsonl").exists()


def test_no_lock_file_is_left_beside_the_outputs(tmp_path):
    """Before, ``s.json.lock``, ``index.html.lock``, ... were left beside every output."""
    storage.write_text(tmp_path / "report.md", "a report")
    Session().write(tmp_path / "s.json")
    append_turn(tmp_path / "s.json", Turn(task="vqa", question="q?", answer="a"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "s.json"]


def test_two_names_of_one_file_share_one_lock(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert storage.lock(tmp_path / "real" / "s.json").lock_file == storage.lock(tmp_path / "link" / "s.json").lock_file
    with storage.lock(tmp_path / "link" / "s.json"):
        with pytest.raises(storage.StorageError, match="another program is writing"):
            storage.write_text(tmp_path / "real" / "s.json", "{}", timeout=0.2)
