"""The one object a stage worker hands tensors through: it picks a backend per tensor on
``put`` and follows ``TensorRef.transport`` on ``get`` and ``delete``, so a worker reads refs
from any producer whatever its own ``DF_TRANSPORT``. Where the next stage runs decides too
(``locality``): shm and CUDA IPC only while all its workers share this shm domain, else Redis;
a ref of another domain is pulled from there."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch

from disagfusion import metrics
from disagfusion.config import Settings
from disagfusion.protocol import TensorRef, TransportName
from disagfusion.transport.base import Transport
from disagfusion.transport.inline import InlineTransport
from disagfusion.transport.locality import Locality, UnreachableBlobError, shm_domain
from disagfusion.transport.redis import RedisTransport
from disagfusion.transport.ref import tensor_from_buffer
from disagfusion.transport.shm import ShmTransport

if TYPE_CHECKING:
    from disagfusion.transport.cuda_ipc import CudaIpcTransport


class Transports:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.inline = InlineTransport()
        self.shm = ShmTransport(settings.shm_dir)
        self.locality = Locality(shm_domain(settings.shm_dir), self.shm)
        self._redis: RedisTransport | None = None
        self._cuda_ipc: CudaIpcTransport | None = None

    @property
    def redis(self) -> RedisTransport:
        if self._redis is None:  # connect lazily: a same-host deployment never needs Redis
            self._redis = RedisTransport(self.settings.redis_url, self.settings.blob_ttl_s, self.settings.redis_tls())
        return self._redis

    @property
    def cuda_ipc(self) -> CudaIpcTransport:
        if self._cuda_ipc is None:  # only GPU workers that hand over CUDA tensors need it
            from disagfusion.transport.cuda_ipc import CudaIpcTransport

            self._cuda_ipc = CudaIpcTransport(self.settings.nats_url, self.settings.ipc_lease_s, tls=self.settings.nats_tls())
        return self._cuda_ipc

    def _backend(self, name: TransportName) -> Transport:
        if name == "inline":
            return self.inline
        if name == "shm":
            return self.shm
        if name == "redis":
            return self.redis
        if name == "cuda_ipc":
            return self.cuda_ipc
        raise ValueError(f"transport {name!r} is not available in this worker")

    def _opened(self) -> list[Transport]:
        """The backends this process uses so far, without opening the lazy ones."""
        return [backend for backend in (self.inline, self.shm, self._redis, self._cuda_ipc) if backend is not None]

    def _for(self, tensor: torch.Tensor, bound_for: tuple[str, str] | None) -> Transport:
        """Inline below ``inline_max_bytes``; Redis when a worker of ``bound_for`` (the next
        stage, the model) runs in another shm domain; else the configured backend. CUDA IPC can
        only share CUDA memory, so CPU tensors go through shm then."""
        if tensor.numel() * tensor.element_size() < self.settings.inline_max_bytes:
            return self.inline
        if bound_for is not None and not self.locality.local_only(*bound_for):
            return self.redis
        if self.settings.transport == "cuda_ipc" and not tensor.is_cuda:
            return self.shm
        return self._backend(self.settings.transport)

    def empty(self, shape: list[int] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor for a stage output that ``put`` hands over without copying: in a shm
        slot where ``put`` would send a CPU tensor of this size through shm, else plain memory."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes >= self.settings.inline_max_bytes and self.settings.transport in ("shm", "cuda_ipc"):
            return self.shm.empty(shape, dtype)
        return torch.empty(shape, dtype=dtype)

    def put(self, key: str, tensor: torch.Tensor, bound_for: tuple[str, str] | None = None) -> TensorRef:
        """Store ``tensor`` for the workers of ``bound_for`` (stage, model): None stores it
        through the configured backend, wherever they run."""
        started = time.perf_counter()
        ref = self._for(tensor, bound_for).put(key, tensor)
        if ref.transport in ("shm", "cuda_ipc"):
            ref = ref.model_copy(update={"domain": self.locality.domain})
        metrics.handoff(ref.transport, "put", ref.nbytes, time.perf_counter() - started)
        return ref

    def _foreign(self, ref: TensorRef) -> bool:
        """Whether ``ref`` lives in another shm domain's memory (refs of old producers name none)."""
        return ref.transport in ("shm", "cuda_ipc") and ref.domain not in (None, self.locality.domain)

    def get(self, ref: TensorRef) -> torch.Tensor:
        started = time.perf_counter()
        if self._foreign(ref):
            if ref.transport == "cuda_ipc":
                raise UnreachableBlobError(f"tensor {ref.key!r} is CUDA memory in shm domain {ref.domain}, "
                                           f"which cannot hand it to another host")
            tensor = tensor_from_buffer(self.locality.fetch(ref), ref.dtype, ref.shape)
            metrics.handoff("pull", "get", ref.nbytes, time.perf_counter() - started)
            return tensor
        self.locality.reads[ref.transport] += 1
        tensor = self._backend(ref.transport).get(ref)
        metrics.handoff(ref.transport, "get", ref.nbytes, time.perf_counter() - started)
        return tensor

    def get_all(self, refs: dict[str, TensorRef]) -> dict[str, torch.Tensor]:
        """One handoff: every tensor of a stage output."""
        return {name: self.get(ref) for name, ref in refs.items()}

    def delete(self, ref: TensorRef) -> None:
        if self._foreign(ref):
            if ref.transport == "shm":
                self.locality.free(ref)
            return
        self._backend(ref.transport).delete(ref)

    def sweep(self) -> int:
        """The janitor's round over every backend opened here (one never used is not opened
        for it): removes what crashed or abandoned jobs left unfreed past ``blob_ttl_s`` (a CUDA
        tensor: past its lease); how many went."""
        return sum(backend.sweep(self.settings.blob_ttl_s) for backend in self._opened())

    def close(self) -> None:
        for backend in self._opened():
            backend.close()
