"""First use: install the model's Python packages into Slicer's Python, with consent.

Nothing is installed at import time. One dialog lists everything that will be installed.
PyTorch comes from the SlicerPyTorch extension's installer (it picks the build that
matches the GPU and driver); the rest comes from pip with a constraints file pinning the
numpy and SimpleITK Slicer ships, so installing RadFM never replaces them.
"""

import importlib.metadata
import os
import tempfile

from .settings import PRECISIONS

TORCH = "torch>=2.3"
PACKAGES = ["transformers>=4.45", "sentencepiece>=0.2", "safetensors>=0.4", "pillow>=10", "tqdm>=4.60", "psutil>=5.9",
            "xxhash>=3.0"]
QUANTIZATION = {"int8": "torchao>=0.18", "int4": "torchao>=0.18", "nf4": "bitsandbytes>=0.48"}
PINNED = ("numpy", "SimpleITK")  # Slicer's own: pip may add packages around them, never swap them


def _satisfied(requirement: str) -> bool:
    from packaging.requirements import Requirement

    wanted = Requirement(requirement)
    try:
        return wanted.specifier.contains(importlib.metadata.version(wanted.name), prereleases=True)
    except importlib.metadata.PackageNotFoundError:
        return False


def missing_requirements(quantization: str | None = None) -> list:
    """What the worker needs and this Python lacks; ``quantization`` adds that tier's library."""
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


def ensure(settings) -> bool:
    """True when the worker can run in Slicer's Python, installing (after one question) if needed.

    A worker in another Python (settings.worker_python) brings its own packages.
    """
    if settings.worker_python:
        return True
    quantization = PRECISIONS[settings.precision][1]
    missing = missing_requirements(quantization)
    if not missing:
        return True
    import slicer

    listing = "\n".join(f"  \u2022 {requirement}" for requirement in missing)
    question = (
        f"RadFM needs these Python packages in Slicer's Python:\n\n{listing}\n\n"
        "PyTorch is installed by the PyTorch extension, which picks the build for your GPU; the others "
        "come from pip. Slicer's own numpy and SimpleITK stay as they are. This can take several minutes.\n\n"
        "Install them now?"
    )
    if not slicer.util.confirmOkCancelDisplay(question, "RadFM: install Python packages"):
        return False
    with slicer.util.tryWithErrorDisplay("Installing RadFM's Python packages failed.", waitCursor=True):
        if TORCH in missing and not _install_torch(slicer):
            return False
        _pip_install(slicer, [r for r in missing if r != TORCH])
    return not missing_requirements(quantization)


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
        f.write(constraints_text())
    try:
        slicer.util.pip_install(["-c", constraints, *requirements])
    finally:
        os.remove(constraints)
