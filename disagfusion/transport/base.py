"""What every tensor transport offers, so the router (``Transports``) and the janitor treat the
backends alike.

A backend stores a tensor under a key and describes it with a ``TensorRef`` whose ``transport``
is its ``name``; any process with the same backend turns that ref back into the tensor. The
calls block; a stage worker runs them off its event loop.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from disagfusion.protocol import TensorRef, TransportName


@runtime_checkable
class Transport(Protocol):
    name: TransportName
    """The ``TensorRef.transport`` of the refs this backend makes and reads."""

    def put(self, key: str, tensor: torch.Tensor) -> TensorRef:
        """Store ``tensor``; the ref that the next stage's task carries. The producer must not
        change the tensor afterwards (a backend may hand over its memory without a copy)."""
        ...

    def get(self, ref: TensorRef) -> torch.Tensor:
        """The tensor ``ref`` names, valid until its ``delete``: ``MissingBlobError`` if it is
        gone, ``ChecksumError`` if the backend checksums bytes and these are not the ones stored.
        It may share the backend's memory (shm does): writes into it stay in this process."""
        ...

    def delete(self, ref: TensorRef) -> None:
        """Free the tensor, once its consumer no longer needs it (its own output is durably
        published). Deleting what is already gone is harmless."""
        ...

    def sweep(self, ttl_s: float) -> int:
        """Remove what crashed or abandoned jobs left unfreed for more than ``ttl_s``; how many
        tensors (or files) went. The janitor of every worker calls it periodically."""
        ...

    def close(self) -> None:
        """Let go of this process's connections and mappings."""
        ...
