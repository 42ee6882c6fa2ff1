"""An isolated, long-lived inference process and the client that talks to it.

``python -m RadFMSlicer.worker`` holds one loaded engine and serves JSON lines on
stdin/stdout (:mod:`.server`); :class:`WorkerClient` (:mod:`.client`) starts it and talks
to it; :mod:`.protocol` is what both sides agree on: the ops, the event shape and the
protocol version.

Keeping the model in its own process means a CUDA error or an out-of-memory kill ends
that process, not the Slicer session that asked; the client then reports the failure and
starts a fresh worker, reloading the last model, on the next request.
"""

from .client import Request, WorkerClient, WorkerError
from .protocol import Event

__all__ = ["Event", "Request", "WorkerClient", "WorkerError"]
