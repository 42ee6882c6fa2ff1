"""Model settings a radiologist sets once, remembered across Slicer sessions.

Stored in a QSettings object under the ``RadFM/`` group (inside Slicer: Slicer's own
settings file). Values are stored as strings so PythonQt and PySide read them back alike.
"""

from dataclasses import asdict, dataclass, fields

GROUP = "RadFM"
DEVICES = ("cuda", "cpu")
RUN_LOCAL, RUN_SERVER = "this computer", "server"
RUN_ON = (RUN_LOCAL, RUN_SERVER)
KEYRING_SERVICE = "RadFMSlicer server token"
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
    run_on: str = RUN_LOCAL  # or RUN_SERVER: a radfm serve at server_url (its token: save_token, never here)
    server_url: str = ""

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
        if settings.run_on not in RUN_ON:
            settings.run_on = cls.run_on
        return settings

    def save(self, store) -> None:
        for name, value in asdict(self).items():
            store.setValue(f"{GROUP}/{name}", value)
        store.sync()

    def load_args(self) -> dict:
        """Keyword arguments for ``WorkerClient.load`` (besides the folder)."""
        dtype, quantization = PRECISIONS[self.precision]
        return {"device": self.device, "dtype": dtype, "quantization": quantization}


# The server token is a password: kept in the platform's keyring (``keyring``: macOS
# Keychain, Windows Credential Locker, Secret Service) and never in the settings file; where
# there is no keyring it lives in memory until Slicer closes.
_session_tokens: dict[str, str] = {}


def save_token(url: str, token: str) -> bool:
    """Remember ``token`` for ``url``; True when the keyring keeps it across sessions."""
    _session_tokens[url] = token
    try:
        import keyring

        keyring.set_password(KEYRING_SERVICE, url, token)
        return True
    except Exception:  # no keyring package or no usable backend: this session only
        return False


def load_token(url: str) -> str | None:
    if url in _session_tokens:
        return _session_tokens[url]
    try:
        import keyring

        return keyring.get_password(KEYRING_SERVICE, url)
    except Exception:
        return None
