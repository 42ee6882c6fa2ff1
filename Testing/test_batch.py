"""Resumable JSON-lines results (radfm batch, radfm eval): valid after any crash, one record per scan."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pydicom.data
import pytest

from RadFMSlicer.batch import finished_ids
from RadFMSlicer.cli import main
from RadFMSlicer.errors import RadFMError

CT = pydicom.data.get_testdata_file("CT_small.dcm")


def records(n, start=0, **extra):
    return b"".join(json.dumps({"id": f"scan{k:05d}", "answer": "x" * 100, **extra}).encode() + b"\n"
                    for k in range(start, start + n))


def lines_of(path):
    return [json.loads(line) for line in Path(path).read_bytes().splitlines()]  # raises if not valid JSONL


def test_a_torn_last_line_is_cut_off_and_kept_aside_without_rewriting_the_rest(tmp_path):
    out = tmp_path / "r.jsonl"
    good = records(50)
    out.write_bytes(good + b'{"id": "scan00050", "answ')
    inode = out.stat().st_ino
    assert len(finished_ids(out)) == 50
    assert out.read_bytes() == good and out.stat().st_ino == inode  # truncated in place, not replaced
    assert (tmp_path / "r.jsonl.rejected").read_bytes() == b'{"id": "scan00050", "answ\n'


def test_repairing_under_a_file_size_limit_loses_no_record(tmp_path):
    """The fault that emptied a 150 MB results file: the repair killed while it rewrote the file.

    A file-size limit below the file's size kills any process that writes past it (SIGXFSZ),
    as a kill -9 would mid-write: cutting the torn line must not need such a write.
    """
    out = tmp_path / "r.jsonl"
    good = records(20000)  # ~2.6 MB
    out.write_bytes(good + b'{"id": "torn')
    limit = len(good) // 2

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code = "import sys; from pathlib import Path; from RadFMSlicer.batch import finished_ids; " \
           "print(len(finished_ids(Path(sys.argv[1]))))"
    done = subprocess.run([sys.executable, "-c", code, str(out)], preexec_fn=limit_file_size,
                          capture_output=True, text=True, timeout=120)
    assert out.read_bytes() == good, done.stderr[-500:]
    assert done.returncode == 0 and done.stdout.strip() == "20000"


def test_a_corrupt_middle_line_leaves_a_valid_file_and_nothing_lost(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_bytes(records(3) + b'{"id": "scan00003", "ans\x00\xff garbage\n' + records(2, start=4))
    assert finished_ids(out) == {"scan00000", "scan00001", "scan00002", "scan00004", "scan00005"}
    assert [r["id"] for r in lines_of(out)] == ["scan00000", "scan00001", "scan00002", "scan00004", "scan00005"]
    assert b"garbage" in (tmp_path / "r.jsonl.rejected").read_bytes()


def test_the_latest_record_of_a_scan_is_the_one_kept(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_bytes(b'{"id": "a", "error": "unreadable"}\n{"id": "b", "answer": "fine"}\n{"id": "a", "answer": "ok"}\n')
    assert finished_ids(out) == {"a", "b"}
    assert lines_of(out) == [{"id": "b", "answer": "fine"}, {"id": "a", "answer": "ok"}]


def test_resuming_under_other_settings_is_refused_naming_the_difference(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_bytes(records(2, run_settings={"task": "report", "max_new_tokens": 256}))
    with pytest.raises(RadFMError, match=r"other settings \(max_new_tokens: 256 -> 12\).*--force"):
        finished_ids(out, {"task": "report", "max_new_tokens": 12})
    assert len(finished_ids(out, {"task": "report", "max_new_tokens": 12}, force=True)) == 2
    assert len(finished_ids(out, {"task": "report", "max_new_tokens": 256})) == 2


def test_batch_keeps_one_record_per_scan_and_refuses_other_settings(capsys, tiny_checkpoint, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    os.symlink(CT, scans / "a_ct.dcm")
    (scans / "b_bad.nii").write_bytes(b"not a scan")
    out = tmp_path / "r.jsonl"
    argv = ["batch", "--checkpoint", str(tiny_checkpoint), "--input", str(scans), "--out", str(out),
            "--max-new-tokens", "2"]
    assert main(argv) == 1
    (scans / "b_bad.nii").unlink()
    os.symlink(CT, scans / "b_bad.nii.dcm")  # the user fixes the scan (a new id) and retries
    (scans / "b_bad.nii").write_bytes(b"still not a scan")
    assert main(argv) == 1
    ids = [r["id"] for r in lines_of(out)]
    assert sorted(ids) == ["a_ct.dcm", "b_bad.nii", "b_bad.nii.dcm"]  # the retried failure once, not twice
    capsys.readouterr()
    assert main(argv[:-1] + ["3"]) == 2
    err = capsys.readouterr().err
    assert "other settings (max_new_tokens: 2 -> 3)" in err.splitlines()[-1]
    assert main(argv[:-1] + ["3", "--force"]) == 1  # resumed: only the still-bad scan is retried
    assert sorted(r["id"] for r in lines_of(out)) == ["a_ct.dcm", "b_bad.nii", "b_bad.nii.dcm"]


def test_a_full_disk_during_a_batch_is_one_line_and_keeps_the_results_before_it(tmp_path):
    """Writing to /dev/full fails as a full disk does."""
    from RadFMSlicer.batch import append_record

    with open("/dev/full", "a") as f, pytest.raises(RadFMError, match=r"could not add the result of 'a' .*kept"):
        append_record(f, {"id": "a", "answer": "x" * 10_000})
