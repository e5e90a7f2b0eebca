"""Tensor handoff between stages.

``Transports.put`` stores a tensor and returns the ``TensorRef`` that travels in the next
stage's message; ``get`` turns a ref back into a tensor, verifying its checksum; ``delete``
frees it once the consumer's own output is durably published. Small tensors go inline, the
rest through the configured transport (shm on one host, redis across hosts, CUDA IPC between
processes on one GPU, where CPU tensors still go through shm). The calls are blocking; the
stage worker runs them off its event loop.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

import torch

from disagfusion.config import Settings
from disagfusion.transport.redis import RedisTransport
from disagfusion.protocol import ChecksumError, MissingBlobError, TensorRef
from disagfusion.transport.ref import describe, tensor_bytes, tensor_from_buffer, verify
from disagfusion.transport.shm import ShmTransport

if TYPE_CHECKING:
    from disagfusion.transport.cuda_ipc import CudaIpcTransport

__all__ = ["ChecksumError", "MissingBlobError", "TensorRef", "Transports"]


class Transports:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.shm = ShmTransport(settings.shm_dir)
        self._redis: RedisTransport | None = None
        self._cuda_ipc: CudaIpcTransport | None = None

    @property
    def redis(self) -> RedisTransport:
        if self._redis is None:  # connect lazily: a same-host deployment never needs Redis
            self._redis = RedisTransport(self.settings.redis_url, self.settings.blob_ttl_s)
        return self._redis

    @property
    def cuda_ipc(self) -> CudaIpcTransport:
        if self._cuda_ipc is None:  # only GPU workers that hand over CUDA tensors need it
            from disagfusion.transport.cuda_ipc import CudaIpcTransport

            self._cuda_ipc = CudaIpcTransport(self.settings.nats_url, self.settings.ipc_lease_s)
        return self._cuda_ipc

    def _backend(self, name: str) -> ShmTransport | RedisTransport | CudaIpcTransport:
        if name == "shm":
            return self.shm
        if name == "redis":
            return self.redis
        if name == "cuda_ipc":
            return self.cuda_ipc
        raise ValueError(f"transport {name!r} is not available in this worker")

    def put(self, key: str, tensor: torch.Tensor) -> TensorRef:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes < self.settings.inline_max_bytes:
            raw = tensor_bytes(tensor)
            return describe(tensor, "inline", key, raw).model_copy(update={"data": raw.tobytes()})
        if self.settings.transport == "cuda_ipc" and not tensor.is_cuda:
            return self.shm.put(key, tensor)
        return self._backend(self.settings.transport).put(key, tensor)

    def get(self, ref: TensorRef) -> torch.Tensor:
        if ref.transport == "inline":
            data = ref.data or b""
            verify(ref, data)
            return tensor_from_buffer(data, ref.dtype, ref.shape)
        return self._backend(ref.transport).get(ref)

    def get_all(self, refs: dict[str, TensorRef]) -> dict[str, torch.Tensor]:
        """One handoff: every tensor of a stage output, after the injected delay if one is set."""
        if refs and (self.settings.handoff_delay_ms or self.settings.handoff_jitter_ms):
            mean, jitter = self.settings.handoff_delay_ms, self.settings.handoff_jitter_ms
            time.sleep(max(0.0, random.uniform(mean - jitter, mean + jitter)) / 1000)
        return {name: self.get(ref) for name, ref in refs.items()}

    def delete(self, ref: TensorRef) -> None:
        if ref.transport != "inline":
            self._backend(ref.transport).delete(ref)

    def close(self) -> None:
        self.shm.close()
        if self._redis is not None:
            self._redis.close()
        if self._cuda_ipc is not None:
            self._cuda_ipc.close()
