"""Tensor handoff between stages.

A stage worker hands tensors through one ``Transports`` (``router.py``), made by
``open_transports``. ``put`` stores a tensor and returns the ``TensorRef`` that travels in the
next stage's message (``empty`` gives a stage an output tensor that ``put`` hands over without
copying); ``get`` turns a ref back into a tensor, verifying its checksum where bytes crossed a
boundary that can corrupt them (Redis, a message);
``delete`` frees it once the consumer's own output is durably published; ``sweep`` is the
janitor's round over what crashed jobs left behind. Small tensors go inline, the rest through
the configured transport (shm on one host, redis across hosts, CUDA IPC between processes on
one GPU, where CPU tensors still go through shm). Each backend implements the ``Transport``
protocol (``base.py``). The calls are blocking; the stage worker runs them off its event loop.
"""

from __future__ import annotations

from disagfusion.config import Settings
from disagfusion.protocol import ChecksumError, MissingBlobError, TensorRef
from disagfusion.transport.base import Transport
from disagfusion.transport.delay import DelayedTransports
from disagfusion.transport.router import Transports

__all__ = [
    "ChecksumError", "DelayedTransports", "MissingBlobError", "TensorRef", "Transport", "Transports", "open_transports",
]


def open_transports(settings: Settings) -> Transports:
    """A stage worker's transports: ``DelayedTransports`` when ``handoff_delay_ms`` or
    ``handoff_jitter_ms`` is set (a benchmark's emulated slow network), else the plain router."""
    if settings.handoff_delay_ms or settings.handoff_jitter_ms:
        return DelayedTransports(settings)
    return Transports(settings)
