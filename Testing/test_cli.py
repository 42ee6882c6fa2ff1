"""The radfm command end to end on real scans (pydicom, nibabel) and a tiny checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pydicom.data
import pytest
import SimpleITK as sitk
from PIL import Image

from RadFMSlicer.cli import main

CT = pydicom.data.get_testdata_file("CT_small.dcm")
MR = pydicom.data.get_testdata_file("MR_small.dcm")
NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"
ANATOMICAL = str(NIBABEL_DATA / "anatomical.nii")
FOUR_D = str(NIBABEL_DATA / "example4d.nii.gz")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def ask(capsys, checkpoint, *extra):
    return run(capsys, "ask", "--checkpoint", checkpoint, "--max-new-tokens", 12, *extra)


def test_ask_streams_an_answer(capsys, tiny_checkpoint):
    code, out, err = ask(capsys, tiny_checkpoint, "--image", CT, "--question", "Is there a pleural effusion")
    assert code == 0 and out.strip() and "Research use only" in err


def test_ask_json_says_what_the_model_saw(capsys, tiny_checkpoint):
    code, out, _ = ask(capsys, tiny_checkpoint, "--image", ANATOMICAL, "--task", "report", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["task"] == "report" and isinstance(result["answer"], str)
    image = result["images"][0]
    assert image["shape"][:3] == [3, 512, 512] and image["shape"][3] % 4 == 0
    assert image["source"] == ANATOMICAL and image["window"]["mode"] == "percentile"
    assert result["provenance"]["model"]["checkpoint"] == str(tiny_checkpoint)


def test_two_scans_and_a_region_mask(capsys, tiny_checkpoint, tmp_path):
    volume = sitk.ReadImage(ANATOMICAL)
    mask = np.zeros(sitk.GetArrayFromImage(volume).shape, np.uint8)
    mask[5:8, 10:20, 20:30] = 1
    mask_image = sitk.GetImageFromArray(mask)
    mask_image.CopyInformation(volume)
    sitk.WriteImage(mask_image, str(tmp_path / "lesion.nii.gz"))
    code, out, err = ask(capsys, tiny_checkpoint, "--image", ANATOMICAL, "--image", ANATOMICAL,
                         "--region", tmp_path / "lesion.nii.gz", "--question", "What has changed", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [i["role"] for i in result["images"]] == ["current", "prior", "region"]
    assert "mL" in result["images"][2]["facts"] and 'the marked region "mask 1":' in result["images"][2]["facts"]
    assert "The second image is the prior study." in result["prompt"]
    assert result["prompt"].count("<image ") == 3


def test_session_file_collects_turns(capsys, tiny_checkpoint, tmp_path):
    session = tmp_path / "s.json"
    for question in ("Is there fluid", "Is there air"):
        assert ask(capsys, tiny_checkpoint, "--image", CT, "--question", question, "--session", session)[0] == 0
    code, _, _ = ask(capsys, tiny_checkpoint, "--image", CT, "--question", "And now", "--session", session,
                     "--include-previous-turns", "--json")
    turns = json.loads(session.read_text())["turns"]
    assert len(turns) == 3 and "Earlier question: Is there fluid?" in turns[2]["prompt"]


def test_batch_is_resumable(capsys, tiny_checkpoint, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for name, source in (("a_ct.dcm", CT), ("b_mr.dcm", MR)):
        (scans / name).write_bytes(Path(source).read_bytes())
    (scans / "c_broken.nii").write_text("not a scan")
    out = tmp_path / "results.jsonl"
    out.write_text(json.dumps({"id": "a_ct.dcm", "answer": "done before"}) + "\n{\"id\": \"b_m")  # torn line
    code, _, err = run(capsys, "batch", "--checkpoint", tiny_checkpoint, "--input", scans, "--out", out,
                       "--max-new-tokens", 4)
    assert code == 1 and "2 to go" in err
    records = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{") and line.endswith("}")]
    by_id = {r["id"]: r for r in records}
    assert by_id["a_ct.dcm"]["answer"] == "done before"  # not redone
    assert "answer" in by_id["b_mr.dcm"] and "error" in by_id["c_broken.nii"]
    code, _, err = run(capsys, "batch", "--checkpoint", tiny_checkpoint, "--input", scans, "--out", out,
                       "--max-new-tokens", 4)
    assert "1 to go" in err  # only the failed scan is retried


def test_batch_from_csv(capsys, tiny_checkpoint, tmp_path):
    (tmp_path / "list.csv").write_text(f"id,image,question\nct1,{CT},Is there fluid\n")
    out = tmp_path / "r.jsonl"
    code, _, _ = run(capsys, "batch", "--checkpoint", tiny_checkpoint, "--input", tmp_path / "list.csv",
                     "--out", out, "--max-new-tokens", 3)
    record = json.loads(out.read_text())
    assert code == 0 and record["id"] == "ct1" and record["question"] == "Is there fluid?"


def test_preview_png_shows_every_slice(capsys, tmp_path):
    out = tmp_path / "p.png"
    code, stdout, _ = run(capsys, "preview", "--image", ANATOMICAL, "--box-ijk", "10,10,2,30,30,6", "--out", out)
    assert code == 0 and stdout.strip() == str(out)
    picture = np.asarray(Image.open(out).convert("L"))
    assert picture.shape[1] > picture.shape[0] and picture.std() > 10


def test_demo_is_labelled_as_a_pipeline_check(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--workdir", tmp_path, "--max-new-tokens", 5)
    assert code == 0 and "not a medical answer" in err and out.startswith("answer: ")
    assert (tmp_path / "session.md").is_file() and list((tmp_path / "previews").glob("*.png"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "/missing/scan.nii"], "not found"),
        (["--image", __file__], "cannot read"),
        (["--image", FOUR_D], "4D"),
        (["--image", CT, "--box", "9000,9000,9000,9100,9100,9100"], "outside"),
        (["--image", CT, "--task", "vqa"], "needs a question"),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, tiny_checkpoint, args, message):
    code, _, err = ask(capsys, tiny_checkpoint, *args)
    lines = err.strip().splitlines()
    assert code == 2 and message.lower() in lines[-1].lower() and lines[-1].startswith("radfm: error:")
    assert "Traceback" not in err


def test_empty_region_mask(capsys, tiny_checkpoint, tmp_path):
    volume = sitk.ReadImage(ANATOMICAL)
    empty = sitk.Image(volume.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(volume)
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    code, _, err = ask(capsys, tiny_checkpoint, "--image", ANATOMICAL, "--region", tmp_path / "empty.nii.gz")
    assert code == 2 and "empty" in err


def test_bad_checkpoint_from_the_real_command(tmp_path):
    """The installed console script: one line on stderr, status 2, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "RadFMSlicer.cli", "ask", "--checkpoint", str(tmp_path), "--image", CT],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("radfm: error:") and "pytorch_model.bin" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_cli_and_the_worker_build_the_same_request():
    from RadFMSlicer.cli import build_parser, join_dashed_values, request_from_args
    from RadFMSlicer.worker.protocol import ask_request_from_json

    argv = ["ask", "--checkpoint", "x", "--image", CT, "--box", "-40,10,-200,-10,40,-170", "--window", "-600,1500",
            "--question", "Is there fluid", "--temperature", "0.5", "--seed", "3"]
    from_cli = request_from_args(build_parser().parse_args(join_dashed_values(argv)))
    from_worker = ask_request_from_json({
        "images": [CT], "regions": [{"box_ras": [[-40, 10, -200], [-10, 40, -170]]}],
        "window": [-600, 1500], "question": "Is there fluid", "temperature": 0.5, "seed": 3})
    assert from_cli == from_worker and from_cli.task == "vqa" and from_cli.window == "-600,1500"


def test_text_output_tells_each_image_note_once(capsys, tiny_checkpoint, tmp_path):
    """The series picked from a folder and a clipped box: --json has them in images[].notes, text on stderr."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for source in (CT, MR):
        (mixed / Path(source).name).write_bytes(Path(source).read_bytes())
    code, out, err = ask(capsys, tiny_checkpoint, "--image", mixed, "--box-ijk", "0,0,0,200,200,0")
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert code == 0 and out.strip()
    assert len(notes) == 2, err  # the close-up keeps its scan's note: told once, under the scan
    assert notes[0].startswith("note: mixed: picked ") and "series" in notes[0]
    assert notes[1] == "note: box 1: box IJK [0, 0, 0]..[200, 200, 0] clipped to the volume"
    code, out, err = ask(capsys, tiny_checkpoint, "--image", mixed, "--json")
    assert code == 0 and "note: " not in err and "picked " in json.loads(out)["images"][0]["notes"][0]


def test_preview_tells_the_image_notes(capsys, tmp_path):
    data = np.linspace(0, 1, 4 * 5 * 6, dtype=np.float32).reshape(6, 5, 4)
    data[1, 2, 3] = np.nan
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), tmp_path / "one_nan.nii.gz")
    code, out, err = run(capsys, "preview", "--image", tmp_path / "one_nan.nii.gz", "--out", tmp_path / "p.png")
    assert code == 0 and out.strip() == str(tmp_path / "p.png")
    assert "note: one_nan.nii.gz: 1 NaN/inf voxels set to the lowest finite value (0)" in err.splitlines()


def interrupt_after_seven_tokens(monkeypatch):
    """Ctrl-C as the eighth token of the next answer is decoded."""
    from RadFMSlicer import generation

    push, pushed = generation.StreamDecoder.push, []

    def interrupted(self, token):
        pushed.append(token)
        if len(pushed) > 7:
            raise KeyboardInterrupt
        return push(self, token)

    monkeypatch.setattr(generation.StreamDecoder, "push", interrupted)


def test_an_interrupted_answer_joins_the_session(capsys, monkeypatch, tiny_checkpoint, tmp_path):
    """Ctrl-C mid-answer: the words so far stay on stdout and are added to --session, stop reason "cancelled"."""
    session = tmp_path / "s.json"
    assert ask(capsys, tiny_checkpoint, "--image", CT, "--question", "Is there fluid", "--session", session)[0] == 0
    interrupt_after_seven_tokens(monkeypatch)
    code, out, err = ask(capsys, tiny_checkpoint, "--image", CT, "--question", "Is there air", "--session", session)
    assert code == 130 and out.strip(), err
    assert err.splitlines()[-1] == f"radfm: interrupted; the answer so far was added to {session} (stop reason: cancelled)"
    first, cut = json.loads(session.read_text())["turns"]
    assert first["question"] == "Is there fluid?" and first["answer"]  # the turn already there is kept
    assert cut["question"] == "Is there air?" and cut["stop_reason"] == "cancelled" and cut["error"] is None
    assert cut["answer"].strip() == out.strip() and cut["images"][0]["label"] == "CT_small.dcm"
    assert cut["provenance"]["model"]["checkpoint"] == str(tiny_checkpoint)
    assert not list(tmp_path.glob(".s.json.*.tmp"))  # written through storage: no temporary file left


def test_an_interrupted_answer_that_cannot_be_saved_says_so(capsys, monkeypatch, tiny_checkpoint, tmp_path):
    from RadFMSlicer import session as session_module
    from RadFMSlicer.errors import RadFMError

    def full_disk(path, turn):
        raise RadFMError(f"could not write {path} (No space left on device)")

    monkeypatch.setattr(session_module, "append_turn", full_disk)
    interrupt_after_seven_tokens(monkeypatch)
    code, out, err = ask(capsys, tiny_checkpoint, "--image", CT, "--question", "Is there air", "--session",
                         tmp_path / "s.json")
    assert code == 130 and out.strip()
    assert err.splitlines()[-1] == (f"radfm: interrupted; the answer so far could not be added to {tmp_path / 's.json'}: "
                                    f"could not write {tmp_path / 's.json'} (No space left on device)")


def test_an_answer_cut_by_a_server_gone_joins_the_session(capsys, tmp_path):
    """A radfm serve that dies mid-answer: one error line, status 2, and the words so far in --session."""
    from server_gone import server_gone_mid_answer

    session = tmp_path / "s.json"
    session.write_text(json.dumps({"format": 1, "title": "kept", "turns": [{"task": "report", "question": "q0",
                                                                             "answer": "earlier"}]}))
    with server_gone_mid_answer(b'event: token\ndata: {"text": "The lungs", "data": {}}\n\n') as url:
        code, out, err = run(capsys, "ask", "--server", url, "--image", CT, "--question", "Is there fluid",
                             "--session", session)
    last = err.splitlines()[-1]
    assert code == 2 and out.strip() == "The lungs"
    assert last.startswith("radfm: error: ") and "mid-answer" in last
    assert last.endswith(f"; the answer so far was added to {session} (stop reason: error)")
    saved = json.loads(session.read_text())
    assert saved["title"] == "kept" and [t["answer"] for t in saved["turns"]] == ["earlier", "The lungs"]
    cut = saved["turns"][1]
    assert cut["stop_reason"] == "error" and "mid-answer" in cut["error"] and cut["question"] == "Is there fluid?"


def test_json_answer_carries_the_research_use_notice(capsys, tiny_checkpoint):
    from RadFMSlicer.session import DISCLAIMER

    code, out, _ = ask(capsys, tiny_checkpoint, "--image", CT, "--question", "Is there fluid", "--json")
    assert code == 0 and json.loads(out)["disclaimer"] == DISCLAIMER and DISCLAIMER.startswith("Research use only.")


def test_preview_names_a_mask_region_once(capsys, tmp_path):
    """The crop of --region reads 'mask 1' (as --box reads 'box 2'), not 'region region 1'."""
    volume = sitk.ReadImage(CT)
    mask = sitk.GetImageFromArray(np.pad(np.ones((1, 20, 20), np.uint8), ((0, 0), (40, 68), (40, 68))))
    mask.CopyInformation(volume)
    sitk.WriteImage(mask, str(tmp_path / "lesion.nii.gz"))
    code, _, err = run(capsys, "preview", "--image", CT, "--region", tmp_path / "lesion.nii.gz",
                       "--box-ijk", "0,0,0,9,9,0", "--out", tmp_path / "p.png")
    assert code == 0 and "region region" not in err
    assert f"region: {CT} [region mask 1] -> tensor [3, 512, 512, 4]" in err.splitlines()
    assert f"region: {CT} [region box 2] -> tensor [3, 512, 512, 4]" in err.splitlines()
