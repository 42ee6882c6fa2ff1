"""What a command imports before it answers: help, a flag error, a preview and ``--server`` never
import torch or transformers (seconds on a cold start); a command that does says so on stderr first.

Each command runs as the user runs it, in its own Python, under ``-X importtime``, which lists
every module the process imported. Times are for ``bench/startup.py``; this asserts the imports.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
import SimpleITK as sitk

CT = pydicom.data.get_testdata_file("CT_small.dcm")
PROJECT = Path(__file__).resolve().parents[1]
MODEL_LIBRARIES = {"torch", "transformers"}
IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| ?( *)(\S+)$")


def radfm(*argv, timeout=600) -> tuple[subprocess.CompletedProcess, set]:
    """Run ``radfm ARGV``; return the finished process (importtime lines taken out of its stderr)
    and the top-level packages it imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "RadFMSlicer.cli", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=PROJECT)
    lines = done.stderr.splitlines()
    packages = {m.group(2).split(".")[0] for m in map(IMPORTED.match, lines) if m}
    done.stderr = "\n".join(line for line in lines if not line.startswith("import time:"))
    return done, packages


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "ct.nii.gz"
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 1000, (12, 64, 64), dtype=np.int16))
    image.SetSpacing((0.7, 0.7, 2.5))
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("argv", [["--help"], ["ask", "--help"]])
def test_help_imports_neither_torch_nor_transformers(argv):
    done, imported = radfm(*argv)
    assert done.returncode == 0 and done.stdout.startswith("usage: radfm")
    assert not imported & MODEL_LIBRARIES


@pytest.mark.parametrize("flags, error", [
    (["--image", "/no/such/scan.nii.gz"], "/no/such/scan.nii.gz"),
    (["--window", "40"], "Unknown window '40'"),
    (["--top-p", "2"], "--top-p"),
    (["--box-ijk", "1,2,3"], "--box-ijk needs 6"),
    (["--question", " "], "--question is empty"),
])
def test_an_error_that_needs_no_model_comes_before_torch(fixture_dir, small_ct, flags, error):
    """A valid checkpoint is given: the typo is still found without importing the model's libraries,
    nor SimpleITK (no scan is read to refuse a flag)."""
    image = [] if "--image" in flags else ["--image", small_ct]
    done, imported = radfm("ask", "--checkpoint", fixture_dir, *image, *flags)
    assert done.returncode == 2 and error in done.stderr and "Traceback" not in done.stderr
    needless = imported & (MODEL_LIBRARIES | {"SimpleITK"})
    assert not needless, f"imported {needless} before refusing: {done.stderr}"


def test_preview_draws_what_the_model_sees_without_torch(small_ct, tmp_path):
    done, imported = radfm("preview", "--image", small_ct, "--out", tmp_path / "p.png")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 0
    assert "tensor [3, 512, 512, 12]" in done.stderr
    assert not imported & MODEL_LIBRARIES


def test_ask_server_needs_neither_torch_nor_transformers(small_ct):
    """The scan is read and sent from the workstation; the model is the server's (here: nothing listens)."""
    done, imported = radfm("ask", "--server", "http://127.0.0.1:9", "--image", small_ct, "--question", "Any mass?")
    assert done.returncode == 2 and "cannot reach the RadFM server at http://127.0.0.1:9" in done.stderr
    assert not imported & MODEL_LIBRARIES


def test_loading_the_model_libraries_is_said_on_stderr_first(tiny_checkpoint):
    """A cold import of torch takes seconds: the terminal says what it waits for, --json stays JSON."""
    done, imported = radfm("ask", "--checkpoint", tiny_checkpoint, "--image", CT, "--max-new-tokens", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert imported >= MODEL_LIBRARIES
    said = done.stderr.splitlines()
    assert said.index("Loading torch and transformers ...") < said.index(f"Loading {tiny_checkpoint} on cpu ...")
    assert json.loads(done.stdout)["answer"] is not None
