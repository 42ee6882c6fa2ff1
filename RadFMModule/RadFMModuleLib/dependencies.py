"""First use: install the model's Python packages into Slicer's Python, with consent.

Nothing is installed at import time. One dialog lists everything that will be installed.
PyTorch comes from the SlicerPyTorch extension's installer (it picks the build that
matches the GPU and driver); the rest comes from pip with a constraints file pinning the
numpy, SimpleITK and torch this Python already has, so installing RadFM never replaces
Slicer's own packages or the PyTorch build the extension chose. If a package that this
Slicer session has already imported changed anyway, Slicer must restart to use it: we
say so and offer the restart. A worker Python chosen in the settings is checked (it
runs and has torch) instead.
"""

import importlib.metadata
import os
import subprocess
import sys
import tempfile

from .settings import PRECISIONS

TORCH = "torch>=2.3"
# What the panel's own process needs even when the worker runs in another Python: psutil ends the
# worker's whole process tree (a launcher may sit in between), filelock guards the files it writes.
PANEL_PACKAGES = ["psutil>=5.9", "filelock>=3.12"]
# The worker's packages besides torch, as pinned in pyproject.toml (a test keeps the two in step);
# numpy, SimpleITK and pydicom come with Slicer.
PACKAGES = ["transformers>=5.24,<6", "sentencepiece>=0.2", "safetensors>=0.4", "pillow>=10", "tqdm>=4.60", "xxhash>=3.0",
            *PANEL_PACKAGES]
QUANTIZATION = {"int8": "torchao>=0.18", "int4": "torchao>=0.18", "nf4": "bitsandbytes>=0.48"}
PINNED = ("numpy", "SimpleITK", "torch")  # present ones stay: pip may add packages around them, never swap them
PYTHON_CHECK_TIMEOUT_S = 120  # importing torch from a cold disk can take a while
_good_pythons = set()  # (path, mtime) of worker Pythons that passed the check in this session


def _satisfied(requirement: str) -> bool:
    from packaging.requirements import Requirement

    wanted = Requirement(requirement)
    try:
        return wanted.specifier.contains(importlib.metadata.version(wanted.name), prereleases=True)
    except importlib.metadata.PackageNotFoundError:
        return False


def missing_requirements(quantization: str | None = None, worker_elsewhere: bool = False) -> list:
    """What this Python lacks: the worker's packages (``quantization`` adds that tier's library), or
    only the panel's own when the worker runs in another Python (``worker_elsewhere``)."""
    if worker_elsewhere:
        wanted = list(PANEL_PACKAGES)
    else:
        wanted = [TORCH, *PACKAGES] + ([QUANTIZATION[quantization]] if quantization else [])
    return [requirement for requirement in wanted if not _satisfied(requirement)]


def constraints_text() -> str:
    """``name==version`` for each pinned package present in this Python."""
    lines = []
    for name in PINNED:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return "".join(line + "\n" for line in lines)


def installed_versions() -> dict:
    """Distribution name (lower case) -> version, for everything in this Python."""
    return {(d.metadata["Name"] or "").lower(): d.version for d in importlib.metadata.distributions()}


def changed_imported(before: dict, after: dict) -> list:
    """Distributions whose version changed (or that were removed) and that this session has imported."""
    imported = {name.split(".", 1)[0] for name in list(sys.modules)}
    owners = importlib.metadata.packages_distributions()  # top-level module -> distributions
    imported_dists = {dist.lower() for module in imported for dist in owners.get(module, ())}
    return sorted(name for name, version in before.items() if after.get(name) != version and name in imported_dists)


def check_worker_python(python: str) -> None:
    """Raise ValueError (one line, what to do) unless ``python`` runs and can import torch."""
    if not os.path.isfile(python):
        raise ValueError(f"Worker Python {python} does not exist: choose a python executable in Model settings, "
                         "or clear the field to use Slicer's own Python.")
    key = (python, os.path.getmtime(python))
    if key in _good_pythons:
        return
    try:
        out = subprocess.run([python, "-c", "import torch, sys; print(torch.__version__)"], capture_output=True,
                             text=True, errors="replace", timeout=PYTHON_CHECK_TIMEOUT_S)
    except OSError as exc:
        raise ValueError(f"Worker Python {python} cannot be run ({exc.strerror or exc}): choose a python "
                         "executable in Model settings.") from exc
    except subprocess.TimeoutExpired as exc:
        raise ValueError(f"Worker Python {python} did not import torch within {PYTHON_CHECK_TIMEOUT_S} s.") from exc
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"Worker Python {python} cannot import torch ({last}): install RadFMSlicer's packages "
                         "into it (pip install <RadFMSlicer folder>), or clear the field to use Slicer's Python.")
    _good_pythons.add(key)


def ensure(settings, log=lambda text: None) -> bool:
    """True when the worker can run, installing into Slicer's Python (after one question) if needed.

    A worker in another Python (settings.worker_python) brings its own packages; it is checked,
    and Slicer's Python still gets the panel's own (PANEL_PACKAGES). Errors are shown in a dialog
    and ``log``\\ ged; they return False.
    """
    import slicer

    if settings.worker_python:
        try:
            check_worker_python(settings.worker_python)
        except ValueError as exc:
            log(str(exc))
            slicer.util.errorDisplay(str(exc), windowTitle="RadFM: worker Python")
            return False
    quantization = PRECISIONS[settings.precision][1]
    missing = missing_requirements(quantization, worker_elsewhere=bool(settings.worker_python))
    if not missing:
        return True

    listing = "\n".join(f"  \u2022 {requirement}" for requirement in missing)
    torch_note = ("PyTorch is installed by the PyTorch extension, which picks the build for your GPU; the others "
                  "come from pip. " if TORCH in missing else "They come from pip. ")
    question = (
        f"RadFM needs these Python packages in Slicer's Python:\n\n{listing}\n\n{torch_note}"
        "Slicer's own numpy and SimpleITK, and an installed PyTorch, stay as they are. "
        "This can take several minutes.\n\nInstall them now?"
    )
    if not slicer.util.confirmOkCancelDisplay(question, "RadFM: install Python packages"):
        return False
    before = installed_versions()
    log("Installing " + ", ".join(missing))
    try:
        with slicer.util.tryWithErrorDisplay("Installing RadFM's Python packages failed.", waitCursor=True):
            if TORCH in missing and not _install_torch(slicer):
                return False
            _pip_install(slicer, [r for r in missing if r != TORCH])
    except Exception as exc:  # shown by tryWithErrorDisplay, which re-raises
        log(f"Installing failed: {exc}")
        return False
    changed = changed_imported(before, installed_versions())
    if changed:
        log("Changed packages already in use: " + ", ".join(changed))
        if slicer.util.confirmOkCancelDisplay(
                f"Installing RadFM's packages changed {', '.join(changed)}, already in use in this Slicer session. "
                "Slicer must restart before RadFM can use them.\n\nRestart Slicer now?", "RadFM: restart Slicer"):
            slicer.util.restart()
        return False
    still = missing_requirements(quantization, worker_elsewhere=bool(settings.worker_python))
    log("Installed." if not still else "Still missing after the install: " + ", ".join(still))
    return not still


def _install_torch(slicer) -> bool:
    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.errorDisplay(
            "RadFM needs PyTorch, which Slicer installs through the PyTorch extension.\n\n"
            "Install \"PyTorch\" from the Extensions Manager, restart Slicer, then ask again."
        )
        return False
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=TORCH[5:])
    return torch is not None


def _pip_install(slicer, requirements: list) -> None:
    if not requirements:
        return
    fd, constraints = tempfile.mkstemp(prefix="radfm-constraints-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(constraints_text())  # after PyTorchUtils: pins the torch it just installed too
    try:
        slicer.util.pip_install(["-c", constraints, *requirements])
    finally:
        os.remove(constraints)
