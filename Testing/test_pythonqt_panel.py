"""The chat panel as Slicer's process runs it: no torch, transformers or SimpleITK, and PythonQt.

Both tests run ``panel_smoke.py`` (build the panel, type key by key, Enter, stream, Stop,
export, every text read in full at 400-440 px, restore, close) in a fresh process whose Python blocks those packages; the model
runs in a worker process of this Python on the parity fixture.

* Under PySide6: always.
* Under real PythonQt: ``RADFM_PYTHONQT`` names a launcher that runs
  ``<launcher> script.py args...`` in a Python with PythonQt initialised and the flat
  ``qt`` module importable, as Slicer's Python console does (build commontk/PythonQt
  against Qt 5.15 and Python 3.12). That Python needs what the panel's own process
  imports: numpy, psutil (ending the worker's process tree) and filelock (export).
  Without a launcher the test is skipped and says why (``pytest -ra`` prints the reason).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SMOKE = Path(__file__).with_name("panel_smoke.py")
LAUNCHER = os.environ.get("RADFM_PYTHONQT", "")


def run_smoke(host: list, fixture_dir, out) -> str:
    """Run the smoke script with ``host`` (a Python, or the PythonQt launcher); returns its output."""
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    done = subprocess.run([*host, str(SMOKE), sys.executable, str(fixture_dir), str(out)], capture_output=True,
                          text=True, timeout=540, env=env)
    output = done.stdout + done.stderr
    print(output)
    assert done.returncode == 0 and "PANEL SMOKE PASSED" in done.stdout, output
    assert "Traceback" not in output, output  # an exception in a Qt slot is only printed: it still fails here
    return done.stdout


def test_a_worker_python_of_its_own_starts_from_inside_slicers_environment(tmp_path):
    """Slicer's launcher sets PYTHONHOME and PYTHONPATH for its Python; another worker Python must not inherit them."""
    from RadFMSlicer.worker import WorkerClient

    other_python = tmp_path / "python3"  # "Worker Python" in Model settings: not the Python the panel runs in
    other_python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    other_python.chmod(0o755)
    slicer_env = {**os.environ, "PYTHONHOME": str(tmp_path / "Slicer" / "lib" / "Python"),
                  "PYTHONPATH": str(tmp_path / "Slicer" / "lib" / "Python" / "site-packages")}
    with WorkerClient.start(python=str(other_python), env=slicer_env) as client:
        assert client.hello(timeout=60)["protocol"]


def test_panel_runs_a_whole_conversation_without_torch_transformers_or_simpleitk(fixture_dir, tmp_path):
    stdout = run_smoke([sys.executable], fixture_dir, tmp_path)
    assert "binding PySide6" in stdout and "restored 2 answers" in stdout


def test_panel_runs_under_real_pythonqt(fixture_dir, tmp_path):
    if not LAUNCHER:
        pytest.skip("no PythonQt build: set RADFM_PYTHONQT to a launcher running scripts in PythonQt "
                    "(see this file's docstring) to run the panel in Slicer's Qt binding")
    if not os.access(LAUNCHER, os.X_OK):
        pytest.fail(f"RADFM_PYTHONQT={LAUNCHER} is not an executable file", pytrace=False)
    stdout = run_smoke([LAUNCHER], fixture_dir, tmp_path)
    assert "binding PythonQt" in stdout and "restored 2 answers" in stdout
