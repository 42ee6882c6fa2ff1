"""Every ``radfm`` command line the README shows runs as written, on stand-ins for its files.

The README's names (``RadFM``, ``ct.nii.gz``, ``scans/``, ...) are made in a scratch folder:
the checkpoint is the tiny random one, the scans are real CT slices put on a geometry that
holds the README's RAS box. Two things are changed and said here: ``--device cuda`` runs
on the CPU when there is no GPU, and answers are cut to 2 tokens. ``radfm serve`` (a
server that runs until stopped) and ``radfm ask --server`` (a client of one) are only parsed.
"""

import json
import re
import shlex
import shutil
from pathlib import Path

import pydicom.data
import pytest
import SimpleITK as sitk
import torch

from RadFMSlicer.cli import build_parser, join_dashed_values, main

README = Path(__file__).resolve().parents[1] / "README.md"
# a server that runs until stopped; a client of a server elsewhere; a PACS elsewhere
PARSED_ONLY = ("serve", "--server", "--dicomweb-auth-file")


def readme_commands() -> list[str]:
    """The ``radfm ...`` command of every line in the README's code blocks (comments cut, continuations joined)."""
    commands, in_block = [], False
    text = re.sub(r"\\\s*(#[^\n]*)?\n\s*", " ", README.read_text())  # "... \<newline>    --more" is one line
    for line in text.splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block and "radfm " in line:
            for part in line.split("&&"):
                part = re.sub(r"\s+#.*$", "", part).strip()
                if part.startswith("radfm "):
                    commands.append(part)
    return commands


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory, tiny_checkpoint):
    """The files the README's commands name."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(tiny_checkpoint, root / "RadFM")
    ct = sitk.ReadImage(pydicom.data.get_testdata_file("CT_small.dcm"))
    stack = sitk.JoinSeries([ct[:, :, 0]] * 16)  # 16 slices, 5 mm apart, centred where the README's box lies (LPS)
    stack.SetSpacing((2.0, 2.0, 5.0))
    stack.SetOrigin((-64.0, -64.0, -225.0))
    stack.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    for name in ("chest_ct.nii.gz", "ct.nii.gz", "now.nrrd", "prior.nrrd"):
        sitk.WriteImage(stack, str(root / name))
    lesion = sitk.Image(stack.GetSize(), sitk.sitkUInt8)
    lesion.CopyInformation(stack)
    lesion[20:30, 20:30, 4:8] = 1
    sitk.WriteImage(lesion, str(root / "lesion.nii.gz"))
    (root / "ct").mkdir()
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), root / "ct" / "slice1.dcm")
    (root / "scans").mkdir()
    shutil.copy(root / "ct.nii.gz", root / "scans" / "patient1.nii.gz")
    (root / "cases.jsonl").write_text(json.dumps({"id": "c1", "images": ["ct.nii.gz"], "task": "modality",
                                                  "reference": "CT"}) + "\n")
    return root


def runnable(command: str) -> list[str]:
    argv = shlex.split(command)[1:]
    if not torch.cuda.is_available():
        argv = ["cpu" if a == "cuda" else a for a in argv]
    if argv[0] in ("ask", "batch", "eval") and "compare" not in argv:
        argv += ["--max-new-tokens", "2"]
    return argv


def test_the_readme_shows_the_commands_a_user_starts_with():
    commands = readme_commands()
    assert any("--box -40," in c for c in commands) and any(c.startswith("radfm demo") for c in commands)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs_as_written(command, readme_folder, monkeypatch, capsys, tmp_path):
    argv = runnable(command)
    if any(word in argv for word in PARSED_ONLY):
        build_parser().parse_args(join_dashed_values(argv))
        return
    monkeypatch.chdir(readme_folder)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # radfm demo must leave nothing behind
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"{command}\n{err[-2000:]}"
    assert "Traceback" not in err and "Warning" not in err, err
    assert not list(tmp_path.iterdir()), "a temporary folder was left behind"


def test_the_readme_test_command_installs_what_the_tests_need_and_is_what_ci_runs():
    """On a fresh clone `python -m pytest` alone fails: No module named pytest."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    test_command = next(line for block in blocks for line in block.splitlines() if "pytest" in line)
    assert test_command.startswith('pip install -e ".[test]" && ')
    ci = (README.parent / ".ci" / "run").read_text()
    assert test_command.replace("pip install", "python -m pip install") in ci


def test_the_readme_says_how_to_install_the_cpu_build_of_pytorch():
    install = next(line for line in README.read_text().splitlines() if line.startswith("pip install torch"))
    assert "--index-url https://download.pytorch.org/whl/cpu" in install and install.endswith("radfm demo")
