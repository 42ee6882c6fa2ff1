"""Model settings a radiologist sets once, remembered across Slicer sessions.

Stored in a QSettings object under the ``RadFM/`` group (inside Slicer: Slicer's own
settings file). Values are stored as strings so PythonQt and PySide read them back alike.
"""

from dataclasses import asdict, dataclass, fields

GROUP = "RadFM"
DEVICES = ("cuda", "cpu")
# What the panel offers -> (dtype, weight quantization) for WorkerClient.load.
PRECISIONS = {
    "bfloat16": ("bfloat16", None),
    "float16": ("float16", None),
    "float32": ("float32", None),
    "int8 weights": ("bfloat16", "int8"),
    "int4 weights": ("bfloat16", "int4"),
    "nf4 weights": ("bfloat16", "nf4"),
}


# Best answers first: what the GPU check offers when the chosen precision does not fit.
PREFERRED = ("bfloat16", "float16", "int8 weights", "int4 weights", "nf4 weights", "float32")


def precision_for_tiers(tiers) -> "str | None":
    """The preferred precision among tiers (``quantization.TIERS`` names: "bfloat16", "int8"...)."""
    offered = {quantization or dtype: name for name, (dtype, quantization) in PRECISIONS.items()}
    fitting = {offered[tier] for tier in tiers if tier in offered}
    return next((name for name in PREFERRED if name in fitting), None)


@dataclass
class ModelSettings:
    checkpoint_folder: str = ""
    device: str = "cuda"
    precision: str = "bfloat16"
    worker_python: str = ""  # empty: the Python the module runs in (Slicer's PythonSlicer)

    @classmethod
    def load(cls, store) -> "ModelSettings":
        """Read from a QSettings; unknown precisions fall back to the default."""
        values = {}
        for f in fields(cls):
            value = store.value(f"{GROUP}/{f.name}")
            if value is not None:
                values[f.name] = str(value)
        settings = cls(**values)
        if settings.precision not in PRECISIONS:
            settings.precision = cls.precision
        return settings

    def save(self, store) -> None:
        for name, value in asdict(self).items():
            store.setValue(f"{GROUP}/{name}", value)
        store.sync()

    def load_args(self) -> dict:
        """Keyword arguments for ``WorkerClient.load`` (besides the folder)."""
        dtype, quantization = PRECISIONS[self.precision]
        return {"device": self.device, "dtype": dtype, "quantization": quantization}
