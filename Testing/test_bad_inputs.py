"""What a new user mistypes: one actionable line, last and alone on stderr, before the model loads.

Every case here runs the real ``radfm`` command with model loading made to fail the test,
so an input error found only after the (minutes-long, for the real release) load fails it.
"""

import os
import re
from pathlib import Path

import nibabel
import numpy as np
import pydicom.data
import pytest
import SimpleITK as sitk

from RadFMSlicer.cli import main

CT = pydicom.data.get_testdata_file("CT_small.dcm")
FOUR_D = str(Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz")


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: these inputs must be refused before it."""
    from RadFMSlicer.engine import RadFMEngine

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(RadFMEngine, "load", classmethod(refuse))


@pytest.fixture
def files(tmp_path):
    """Named bad and good files in a folder: ``files / name``."""
    volume = sitk.ReadImage(CT)
    mask = sitk.GetImageFromArray(np.pad(np.ones((1, 20, 20), np.uint8), ((0, 0), (40, 68), (40, 68))))
    mask.CopyInformation(volume)
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    (tmp_path / "a_file").write_text("not a folder")
    data = np.linspace(0, 1, 4 * 5 * 6, dtype=np.float32).reshape(6, 5, 4)
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), tmp_path / "cut.nii")
    (tmp_path / "cut.nii").write_bytes((tmp_path / "cut.nii").read_bytes()[:400])
    nibabel.save(nibabel.Nifti1Image(np.full((4, 5, 6), np.nan, np.float32), np.eye(4)), tmp_path / "nan.nii.gz")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "not_a_session.json").write_text('{"hello": 1}')
    (tmp_path / "no_image_column.csv").write_text("id,path\nx,y.nii\n")
    (tmp_path / "image_twice.csv").write_text("id,image,image\na,x.nii,y.nii\n")
    (tmp_path / "latin1.csv").write_bytes("id,image\npatient_\xe9,x.nii\n".encode("latin-1"))
    return tmp_path


ASK = ["ask", "--checkpoint", "{ckpt}", "--image", CT, "--max-new-tokens", "4"]
PREVIEW = ["preview", "--image", CT]
BATCH = ["batch", "--checkpoint", "{ckpt}", "--input", "{tmp}/empty_dir"]

# (name, command line, what the one error line must say)
BAD_INPUTS = [
    ("mask label not an integer", ASK + ["--region", "{tmp}/mask.nii.gz:abc"], "label after ':' must be an integer"),
    ("mask label absent", ASK + ["--region", "{tmp}/mask.nii.gz:5"], "Label 5 is not in the mask"),
    ("mask missing", ASK + ["--region", "{tmp}/missing.nii.gz"], "Label map not found"),
    ("session under a file", ASK + ["--session", "{tmp}/a_file/s.json"], "a_file is a file, not a folder"),
    ("session in /proc", ASK + ["--session", "/proc/radfm-s.json"], "cannot write session file /proc/radfm-s.json"),
    ("session is a folder", ASK + ["--session", "{tmp}/empty_dir"], "session file .*empty_dir is a folder"),
    ("session not a session", ASK + ["--session", "{tmp}/not_a_session.json"], "not_a_session.json"),
    ("preview dir under a file", ASK + ["--preview-dir", "{tmp}/a_file/p"], "a_file is a file, not a folder"),
    ("preview dir in /proc", ASK + ["--preview-dir", "/proc/radfm-previews"], "cannot write preview folder"),
    ("window width 0", ASK + ["--window", "40,0"], "width must be a number > 0"),
    ("window unknown", ASK + ["--window", "liver"], "Unknown window 'liver'"),
    ("window NaN", ASK + ["--window", "nan,400"], 'Window centre must be a finite number .*"40,400"'),
    ("box too short", ASK + ["--box", "1,2,3"], "--box needs 6 comma-separated numbers"),
    ("box NaN", ASK + ["--box", "nan,0,0,1,1,1"], "must be finite"),
    ("box outside", ASK + ["--box-ijk", "900,900,0,950,950,0"], "lies entirely outside the volume"),
    ("diagnosis without finding", ASK + ["--task", "diagnosis"], "needs the finding to look for"),
    ("vqa without question", ASK + ["--task", "vqa"], "task vqa needs a question"),
    ("empty question", ASK + ["--question", "   "], "task vqa needs a question"),
    ("temperature NaN", ASK + ["--temperature", "nan"], "temperature must be a finite number"),
    ("top-p 0", ASK + ["--top-p", "0"], r"top_p must be in \(0, 1\]"),
    ("max tokens 0", ASK + ["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    ("device without GPU", ASK + ["--device", "cuda"], "PyTorch sees no CUDA GPU"),
    ("device unknown", ASK + ["--device", "tpu"], "unknown device 'tpu'"),
    ("int8 with float32", ASK + ["--quantization", "int8", "--dtype", "float32"], "not float32"),
    ("checkpoint missing", ["ask", "--checkpoint", "{tmp}/nowhere", "--image", CT], "checkpoint folder not found"),
    ("scan missing", ["ask", "--checkpoint", "{ckpt}", "--image", "{tmp}/nowhere.nii"], "Scan not found"),
    ("scan truncated", ["ask", "--checkpoint", "{ckpt}", "--image", "{tmp}/cut.nii"], "cut.nii is truncated"),
    ("scan all NaN", ["ask", "--checkpoint", "{ckpt}", "--image", "{tmp}/nan.nii.gz"], "only NaN/inf values"),
    ("scan 4D", ["ask", "--checkpoint", "{ckpt}", "--image", FOUR_D], "is a 4D image"),
    ("scan folder without DICOM", ["ask", "--checkpoint", "{ckpt}", "--image", "{tmp}/empty_dir"],
     "No DICOM series found"),
    ("series for a file", ASK + ["--series", "abc"], "only applies to a DICOM folder"),
    ("too many images", ASK + ["--image", CT] * 10, "at most 10 images and regions"),
    ("preview out under a file", PREVIEW + ["--out", "{tmp}/a_file/p.png"], "a_file is a file, not a folder"),
    ("preview out in /proc", PREVIEW + ["--out", "/proc/radfm.png"], "cannot write preview --out /proc/radfm.png"),
    ("preview out no extension", PREVIEW + ["--out", "{tmp}/montage"], "give a file name ending in .png"),
    ("preview out unknown extension", PREVIEW + ["--out", "{tmp}/montage.xyz"], "give a file name ending in .png"),
    ("batch out a folder", BATCH + ["--out", "{tmp}/empty_dir"], "results file .*empty_dir is a folder"),
    ("batch out under a file", BATCH + ["--out", "{tmp}/a_file/r.jsonl"], "a_file is a file, not a folder"),
    ("batch out in /proc", BATCH + ["--out", "/proc/radfm.jsonl"], "cannot write results file"),
    ("batch input missing", ["batch", "--checkpoint", "{ckpt}", "--input", "{tmp}/nowhere", "--out", "{tmp}/r.jsonl"],
     "batch input not found"),
    ("batch input empty", BATCH + ["--out", "{tmp}/r.jsonl"], "no scans found"),
    ("batch CSV without image column", ["batch", "--checkpoint", "{ckpt}", "--input", "{tmp}/no_image_column.csv",
                                        "--out", "{tmp}/r.jsonl"], "needs an 'image' column"),
    ("batch CSV not UTF-8", ["batch", "--checkpoint", "{ckpt}", "--input", "{tmp}/latin1.csv",
                             "--out", "{tmp}/r.jsonl"], r"latin1.csv line 2 is not UTF-8 text \(byte 0xe9 at column 9"),
    ("batch CSV column twice", ["batch", "--checkpoint", "{ckpt}", "--input", "{tmp}/image_twice.csv",
                                "--out", "{tmp}/r.jsonl"], "image_twice.csv line 1: the column 'image' appears twice"),
    ("batch window unknown", BATCH + ["--out", "{tmp}/r.jsonl", "--window", "liver"], "Unknown window 'liver'"),
    ("session empty", ASK + ["--session", ""], "--session is empty: give a value, or leave the flag out"),
    ("preview dir empty", ASK + ["--preview-dir", " "], "--preview-dir is empty"),
    ("attention file empty", ASK + ["--attention", ""], "--attention is empty"),
    ("window empty", ASK + ["--window", ""], "--window is empty"),
    ("batch max tokens 0", BATCH + ["--out", "{tmp}/r.jsonl", "--max-new-tokens", "0"],
     "--max-new-tokens: max_new_tokens must be a positive integer"),
    ("eval device unknown", ["eval", "--checkpoint", "{ckpt}", "--manifest", "{tmp}/m.jsonl", "--out", "{tmp}/run",
                             "--device", "tpu"], "unknown device 'tpu'"),
    ("window centre inf", ASK + ["--window", "inf,400"], r"Window centre must be a finite number \(got centre inf"),
    ("window lost in float32", ASK + ["--window", "1e30,1"], "Window 1e\\+30,1 cannot be applied: scans are windowed in"),
    ("box beyond float range", ASK + ["--box", "-1.7e308,0,0,1.7e308,5,5"], "is too far out to place on the volume"),
    ("checkpoint is the weights file", ["ask", "--checkpoint", "{ckpt}/pytorch_model.bin", "--image", CT],
     r"the checkpoint .*pytorch_model.bin is a file: give the folder that holds it"),
    ("question empty string", ASK + ["--question", ""],
     "^radfm: error: --question is empty: task vqa needs a question; pass one, or choose --task report$"),
    ("question empty for vqa", ASK + ["--task", "vqa", "--question", ""], "--question is empty: .* choose --task report"),
    ("image empty", ["ask", "--checkpoint", "{ckpt}", "--image", ""],
     "^radfm: error: --image is empty: give a scan file or a DICOM folder$"),
    ("preview image empty", ["preview", "--image", "", "--out", "{tmp}/p.png"], "--image is empty: give a scan file"),
    ("region empty", ASK + ["--region", ""], "--region is empty: give a label map file"),
    ("max tokens 0 names the flag", ASK + ["--max-new-tokens", "0"],
     "^radfm: error: --max-new-tokens: max_new_tokens must be a positive integer, got 0$"),
    ("top-p names the flag", ASK + ["--top-p", "1.5"], r"--top-p: top_p must be in \(0, 1\], got 1.5"),
    ("top-k names the flag", ASK + ["--top-k", "-1"], "--top-k: top_k must be >= 0"),
    ("temperature names the flag", ASK + ["--temperature", "-1"], "--temperature: temperature must be >= 0"),
    ("repetition penalty names the flag", ASK + ["--repetition-penalty", "0"], "--repetition-penalty: repetition_penalty"),
    ("question not UTF-8", ASK + ["--question", "Is there fluid" + b"\xff".decode("utf-8", "surrogateescape") + "?"],
     r"^radfm: error: the question is not UTF-8 text \(byte 0xff at character 15\): type it again"),
    ("question lone surrogate", ASK + ["--question", "Is there \ud800 fluid?"], "holds a lone surrogate U\\+D800"),
    ("question with NUL", ASK + ["--question", "Is there\x00 fluid?"], "control character U\\+0000 at character 9"),
    ("question image tag", ASK + ["--question", "Compare <image> with the prior"],
     "the question contains '<image>', one of the model's own image tags"),
    ("question closing image tag", ASK + ["--question", "What is in </image>?"], "contains '</image>'"),
    ("question image slot tag", ASK + ["--question", "Describe <image40> please"], "contains '<image40>'"),
    ("diagnosis finding image tag", ASK + ["--task", "diagnosis", "--question", "<image0>"], "contains '<image0>'"),
    ("history image tag", ASK + ["--history", "58 y <image> male", "--question", "Any fluid?"],
     "the clinical history contains '<image>'"),
    ("history escape", ASK + ["--history", "58 y \x1b[2J male", "--question", "Any fluid?"],
     "the clinical history holds the control character U\\+001B"),
    ("eval max tokens names the flag", ["eval", "--checkpoint", "{ckpt}", "--manifest", "{tmp}/m.jsonl", "--out",
                                        "{tmp}/run", "--max-new-tokens", "0"], "--max-new-tokens: max_new_tokens must be"),
]


def run_cli(capsys, argv, checkpoint, tmp):
    code = main([a.format(ckpt=checkpoint, tmp=tmp) for a in argv])
    return code, *capsys.readouterr()


@pytest.mark.parametrize("argv, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_before_the_model_loads(capsys, no_model, files, tiny_checkpoint, argv, message):
    if "/proc/" in " ".join(argv) and not os.path.isdir("/proc"):
        pytest.skip("no /proc on this system")
    code, out, err = run_cli(capsys, argv, tiny_checkpoint, files)
    lines = err.splitlines()
    assert code == 2, err
    assert lines and lines[-1].startswith("radfm: error: "), err
    assert re.search(message, lines[-1]), lines[-1]
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in err and "Loading" not in err


def test_an_error_after_a_streamed_answer_starts_on_its_own_line(capsys, monkeypatch, tiny_checkpoint, tmp_path):
    """A session that cannot be saved: the answer is printed in full, then the error alone."""
    from RadFMSlicer import session as session_module
    from RadFMSlicer.errors import RadFMError

    def full_disk(path, turn):
        raise RadFMError(f"could not write {path} (No space left on device)")

    monkeypatch.setattr(session_module, "append_turn", full_disk)
    code, out, err = run_cli(capsys, ASK + ["--question", "Is there fluid", "--session", "{tmp}/s.json"],
                             tiny_checkpoint, tmp_path)
    assert code == 2 and out.endswith("\n") and out.strip()  # the answer reached the user
    assert err.splitlines()[-1].startswith("radfm: error: the answer above was not added to")


def test_a_reader_that_goes_away_ends_the_command_without_a_traceback(tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "-m", "RadFMSlicer.cli", "preview", "--image", CT, "--out", str(tmp_path / "p.png")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # as `radfm preview ... | head -0` would
    err = process.stderr.read()
    assert process.wait(timeout=120) == 141 and "Traceback" not in err, err[-800:]


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_a_cut_npy_array_from_the_panel_is_an_image_error(tmp_path, keep):
    from RadFMSlicer.ask import ImageInput, RegionInput
    from RadFMSlicer.errors import ImageError

    path = tmp_path / "volume.npy"
    np.save(path, np.zeros((8, 16, 16), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ImageError, match="is truncated or not a .npy array"):
        ImageInput.from_json({"array": str(path), "ijk_to_ras": np.eye(4).tolist()})
    with pytest.raises(ImageError, match="is truncated or not a .npy array"):
        RegionInput.from_json({"mask": str(path)})


@pytest.mark.parametrize("fields, message", [
    ({"images": ["/nowhere/ct.nii.gz"]}, "Scan not found"),
    ({"images": [CT], "window": "liver"}, "Unknown window 'liver'"),
    ({"images": [CT], "task": "diagnosis"}, "needs the finding"),
    ({"images": [CT], "regions": [{"box_ras": [[0, 0], [1, 1, 1]]}]}, "must be 3 numbers"),
    ({"images": [CT], "question": "Is <image5> clear?"}, "the question contains '<image5>'"),
    ({"images": [CT], "question": "Any fluid?", "history": "cough \udcff"}, "the clinical history is not UTF-8"),
    ({"images": [CT], "questoin": "Any fluid?"}, "unknown request field(s) ['questoin']"),
    ({"images": [{"path": CT, "role": "future"}]}, "an image's role takes 'current' or 'prior', got 'future'"),
])
def test_the_worker_refuses_a_bad_ask_at_once_not_after_the_queued_load(fields, message):
    from test_worker import Recorder

    from RadFMSlicer.worker.server import WorkerServer

    sink = Recorder()
    server = WorkerServer(sink, heartbeat_s=0)  # work thread not started: a queued load never finishes
    server.handle({"id": "load", "op": "load", "checkpoint": "/models/RadFM"})
    server.handle({"id": "q", "op": "ask", **fields})
    (final,) = sink.finals("q")
    assert final.kind == "error" and message in final.text


@pytest.mark.parametrize("argv", [ASK + ["--box", "-1e308,0,0,1e308,5,5"], ASK + ["--window", "1e30,1"]],
                         ids=["box near the float limit", "window lost in float32"])
def test_extreme_numbers_give_the_error_line_without_numpy_warnings(capsys, no_model, tiny_checkpoint, tmp_path,
                                                                     recwarn, argv):
    code, out, err = run_cli(capsys, argv, tiny_checkpoint, tmp_path)
    assert code == 2 and err.startswith("radfm: error: ") and len(err.splitlines()) == 1, err
    assert not recwarn.list, [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in recwarn.list]


def _api_cases():
    from RadFMSlicer.ask import AskRequest, ImageInput, validate
    from RadFMSlicer.generation import GenerationSettings
    from RadFMSlicer.session import Session

    box = {"box_ras": [[0, 0, 0], [1, 1, 1]]}
    return [
        (lambda: AskRequest.from_dict({"images": [CT], "questoin": "x"}), r"unknown request field\(s\) \['questoin'\]"),
        (lambda: AskRequest.from_dict({"images": [CT], "settings": {"max_new_tokens": 4}}),
         r"unknown request field\(s\) \['settings'\]; known: .*'max_new_tokens'"),
        (lambda: AskRequest(images=[ImageInput(CT)], settings={"max_new_tokens": 4}),
         "^settings takes a GenerationSettings .*max_new_tokens.*, got dict"),
        (lambda: AskRequest.from_dict({"images": CT}), "^images takes a list of images .*got str"),
        (lambda: AskRequest(images=CT, settings=GenerationSettings()), "^images takes a list of ImageInput"),
        (lambda: AskRequest(images=[CT]), r"^images\[0\] takes an ImageInput, got str"),
        (lambda: AskRequest.from_dict({"images": [{"path": 5}]}), "^an image's path takes a file or folder path, got int 5"),
        (lambda: AskRequest.from_dict({"images": [{"path": CT, "role": "future"}]}),
         "^an image's role takes 'current' or 'prior', got 'future'"),
        (lambda: AskRequest.from_dict({"images": [{"array": 5}]}), "^an image's array takes the path of a .npy file"),
        (lambda: AskRequest.from_dict({"images": [CT], "question": 5}), "^question takes text, got int 5"),
        (lambda: AskRequest.from_dict({"images": [CT], "history": ["a"]}), r"^history takes text, got list"),
        (lambda: AskRequest.from_dict({"images": [CT], "regions": [{**box, "margin_mm": "10"}]}),
         "^a region's margin_mm takes a number of mm, got str"),
        (lambda: AskRequest.from_dict({"images": [CT], "regions": [{**box, "name": 7}]}), "^a region's name takes text"),
        (lambda: AskRequest.from_dict({"images": [CT], "include_previous_turns": "yes"}),
         "^include_previous_turns takes true or false, got str"),
        (lambda: validate({"images": [CT]}), r"^the request takes an AskRequest \(AskRequest.from_dict"),
        (lambda: Session().add_turn({"task": "vqa", "question": 5}), "^a turn's question takes text, got int"),
        (lambda: Session().add_turn({"task": "vqa", "question": "q", "answr": "x"}), r"unknown turn field\(s\) \['answr'\]"),
        (lambda: Session(turns="x"), "^a session's turns take a list of Turn"),
    ]


@pytest.mark.parametrize("case", range(18))
def test_the_python_api_refuses_a_wrong_field_at_the_door(case):
    """Unknown keys and wrong types in AskRequest, ImageInput, RegionInput and Session: one RequestError (a
    ValueError) naming the field and what it takes, not an AttributeError or TypeError from deep inside."""
    from RadFMSlicer.errors import RequestError

    make, message = _api_cases()[case]
    with pytest.raises(RequestError, match=message):
        make()


def test_the_engine_and_a_session_file_refuse_what_is_not_theirs(tiny_engine, tmp_path):
    from RadFMSlicer.errors import ImageError, PromptError, RadFMError, RequestError
    from RadFMSlicer.session import Session

    from RadFMSlicer.ask import AskRequest, ImageInput, ask
    from RadFMSlicer.engine import RadFMEngine

    with pytest.raises(RequestError, match="^folder takes the checkpoint folder's path, got int 5"):
        RadFMEngine.load(5)
    with pytest.raises(PromptError, match="^the question contains '</image>'"):  # the library asks as the CLI does
        ask(tiny_engine, AskRequest(question="Where is </image>?", images=[ImageInput(CT)]))
    with pytest.raises(RequestError, match="^images takes a list of ModelImage or tensors"):
        tiny_engine.stream("Any fluid?", CT)
    with pytest.raises(ImageError, match="^an image for the model is a ModelImage .*got str"):
        tiny_engine.stream("Any fluid?", [CT])
    with pytest.raises(RequestError, match="^settings takes a GenerationSettings, got dict"):
        tiny_engine.stream("Any fluid?", [], {"max_new_tokens": 3})
    with pytest.raises(PromptError, match=r"^the prompt is not UTF-8 text \(U\+DCFF at character 5\)"):
        tiny_engine.tokenize("Any \udcff fluid?")
    session = tmp_path / "s.json"
    session.write_text('{"format": 1, "turns": [{"task": "vqa", "question": "q", "answr": "x"}]}')
    with pytest.raises(RadFMError, match=r"s.json: not a RadFM session file: unknown turn field\(s\) \['answr'\]"):
        Session.read(session)
    session.write_text('{"format": 1, "turns": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(RadFMError, match="s.json: not a RadFM session file: its JSON is nested too deeply"):
        Session.read(session)
