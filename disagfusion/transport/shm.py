"""Same-host handoff: one file per tensor in a tmpfs directory (/dev/shm), mapped by the reader.

The producer writes the bytes once; the consumer maps the file copy-on-write, so the tensor it
gets is backed by the page cache pages the producer wrote, with no copy. A tensor from ``get``
is valid until its ``delete``.

Large blobs are recycled: ``delete`` renames the file into a free pool (``.free-<bytes>-<id>``)
instead of unlinking it, and a later ``put`` of the same size overwrites one. Allocating fresh
tmpfs pages (and freeing them on unlink) costs more than copying the bytes themselves
(bench/transport.py breaks a handoff into its parts); same-size handoffs are the common case,
as every job of a shape hands over tensors of the same sizes. Renames are atomic, so
producers and consumers in different processes share the pool without locks. The janitor
removes pooled files like any blob, once unused for the TTL.
"""

from __future__ import annotations

import mmap
import os
import time
import uuid
from pathlib import Path

import torch

from disagfusion.transport.ref import TensorRef, describe, tensor_bytes, tensor_from_buffer, verify

FREE_PREFIX = ".free-"
RECYCLE_MIN_BYTES = 1 << 20
"""Below this, creating a file costs little and a pool is not worth its directory scans."""


class MissingBlobError(LookupError):
    """The tensor a message points to is gone (expired, deleted or never written here)."""


class ShmTransport:
    name = "shm"

    def __init__(self, directory: Path, pool_bytes: int = 1 << 30):
        self.directory = directory
        self.pool_bytes = pool_bytes
        """At most this many bytes of deleted blobs are kept for reuse."""
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.directory / key

    def put(self, key: str, tensor: torch.Tensor) -> TensorRef:
        raw = tensor_bytes(tensor)
        path = self._path(key)
        tmp = path.with_name(path.name + ".tmp")
        if not self._take_free(raw.nbytes, tmp):
            with open(tmp, "wb") as f:
                f.write(raw.data)
        else:
            fd = os.open(tmp, os.O_WRONLY)
            try:
                data, written = raw.data.cast("B"), 0
                while written < len(data):  # one call writes at most ~2 GiB
                    written += os.pwrite(fd, data[written:], written)
            finally:
                os.close(fd)
        os.replace(tmp, path)  # a reader never sees a half-written file
        return describe(tensor, "shm", key, raw)

    def get(self, ref: TensorRef) -> torch.Tensor:
        try:
            with open(self._path(ref.key), "rb") as f:
                if ref.nbytes == 0:
                    view = memoryview(b"")
                else:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                    # Map every page now, in one call, rather than one fault per page later.
                    mapped.madvise(mmap.MADV_WILLNEED)
                    view = memoryview(mapped)
        except FileNotFoundError:
            raise MissingBlobError(f"tensor {ref.key!r} is not in {self.directory} (expired or deleted)") from None
        verify(ref, view)
        return tensor_from_buffer(view, ref.dtype, ref.shape)

    def delete(self, ref: TensorRef) -> None:
        path = self._path(ref.key)
        if ref.nbytes >= RECYCLE_MIN_BYTES and sum(self._free_sizes().values()) + ref.nbytes <= self.pool_bytes:
            try:
                os.rename(path, self.directory / f"{FREE_PREFIX}{ref.nbytes}-{uuid.uuid4().hex}")
            except FileNotFoundError:
                pass
            return
        path.unlink(missing_ok=True)

    def _free_sizes(self) -> dict[str, int]:
        """Pooled file name -> its size (read from the name: no stat per file)."""
        sizes = {}
        for name in os.listdir(self.directory):
            if name.startswith(FREE_PREFIX):
                sizes[name] = int(name[len(FREE_PREFIX) :].split("-", 1)[0])
        return sizes

    def _take_free(self, nbytes: int, destination: Path) -> bool:
        """Move a pooled file of exactly ``nbytes`` to ``destination``; False if there is none."""
        if nbytes < RECYCLE_MIN_BYTES:
            return False
        for name, size in self._free_sizes().items():
            if size != nbytes:
                continue
            try:
                os.rename(self.directory / name, destination)
                return True
            except FileNotFoundError:
                continue  # another producer took it first
        return False

    def remove_expired(self, ttl_s: float) -> int:
        """Delete blobs older than ``ttl_s``: leftovers of crashed producers or abandoned jobs,
        and pooled files nobody reused."""
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
