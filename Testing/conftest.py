"""Shared test fixtures: the parity fixture made with the official RadFM code, RadFM's training prompts, loaded engines.

Both live beside the project (CI has them there too): the fixture at ``../shared/fixtures/radfm-tiny``,
the prompts (the ``*_prompt.json`` files of RadFM's training code) at ``../shared/radfm-prompts``. If
either is missing the tests fail loudly: skipping would hide a parity regression.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

PROJECT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("RADFM_FIXTURE", PROJECT.parent / "shared" / "fixtures" / "radfm-tiny"))
PROMPTS = Path(os.environ.get("RADFM_PROMPTS", PROJECT.parent / "shared" / "radfm-prompts"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not (FIXTURE / "pytorch_model.bin").is_file() or not (FIXTURE / "cases.pt").is_file():
        pytest.fail(
            f"parity fixture not found at {FIXTURE}: the RadFM tests need ../shared/fixtures/radfm-tiny "
            f"beside the project (or RADFM_FIXTURE=<folder>)",
            pytrace=False,
        )
    return FIXTURE


@pytest.fixture(scope="session")
def training_prompts():
    """``training_prompts("report_prompt.json")``: the prompts RadFM was trained with, from that file."""
    if not (PROMPTS / "report_prompt.json").is_file():
        pytest.fail(f"RadFM's training prompts not found at {PROMPTS}: the prompt tests need ../shared/radfm-prompts "
                    f"beside the project (or RADFM_PROMPTS=<folder>)", pytrace=False)

    def read(source: str) -> list[str]:
        return [p for prompts in json.loads((PROMPTS / source).read_text()).values() for p in prompts]

    return read


@pytest.fixture(scope="session")
def fixture_cases(fixture_dir) -> dict:
    return torch.load(fixture_dir / "cases.pt", weights_only=False)


@pytest.fixture(scope="session")
def engine(fixture_dir):
    from RadFMSlicer.engine import RadFMEngine

    return RadFMEngine.load(fixture_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, fixture_dir) -> Path:
    """A small random checkpoint with the real tokenizer: fast enough for 512x512 volumes."""
    from RadFMSlicer.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer_model=fixture_dir / "Language_files" / "tokenizer.model")


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    from RadFMSlicer.engine import RadFMEngine

    return RadFMEngine.load(tiny_checkpoint)


@pytest.fixture
def slicer(monkeypatch, tmp_path_factory):
    """Slicer's own MRML (slicer-core) started as the application starts it (``slicer_host``), with the
    Qt side that slicer-core lacks (``slicer_standin``) put in place for this test only; returns ``slicer``."""
    monkeypatch.syspath_prepend(str(PROJECT / "RadFMModule"))  # the stand-in's Qt side is the module's qt_shim
    import slicer
    import slicer_standin

    host = slicer_standin.start_slicer(str(tmp_path_factory.mktemp("slicer-temp")),
                                       lambda obj, name, value: monkeypatch.setattr(obj, name, value, raising=False),
                                       lambda name, module: monkeypatch.setitem(sys.modules, name, module))
    yield slicer
    host.stop()


@pytest.fixture
def dialogs(slicer):
    """What Slicer's dialogs showed in this test (``shown``), the user's answer (``consent``), installs and restarts."""
    return slicer.app.dialogs
