"""Same-host handoff: one file per tensor in a tmpfs directory (/dev/shm), mapped by the reader.

The producer writes the bytes once; the consumer maps the file copy-on-write, so the tensor it
gets is backed by the page cache pages the producer wrote, with no copy.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import torch

from disagfusion.transport.ref import TensorRef, describe, tensor_bytes, tensor_from_buffer, verify


class MissingBlobError(LookupError):
    """The tensor a message points to is gone (expired, deleted or never written here)."""


class ShmTransport:
    name = "shm"

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.directory / key

    def put(self, key: str, tensor: torch.Tensor) -> TensorRef:
        raw = tensor_bytes(tensor)
        path = self._path(key)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(raw.data)
        os.replace(tmp, path)  # a reader never sees a half-written file
        return describe(tensor, "shm", key, raw)

    def get(self, ref: TensorRef) -> torch.Tensor:
        try:
            with open(self._path(ref.key), "rb") as f:
                if ref.nbytes == 0:
                    view = memoryview(b"")
                else:
                    view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))
        except FileNotFoundError:
            raise MissingBlobError(f"tensor {ref.key!r} is not in {self.directory} (expired or deleted)") from None
        verify(ref, view)
        return tensor_from_buffer(view, ref.dtype, ref.shape)

    def delete(self, ref: TensorRef) -> None:
        self._path(ref.key).unlink(missing_ok=True)

    def remove_expired(self, ttl_s: float) -> int:
        """Delete blobs older than ``ttl_s``: leftovers of crashed producers or abandoned jobs."""
        cutoff = time.time() - ttl_s
        removed = 0
        for path in self.directory.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # another worker's janitor got there first
        return removed
