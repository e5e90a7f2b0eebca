"""Same-GPU handoff: a CUDA IPC handle to the producer's own memory, no copy at all.

``put`` keeps the tensor alive in the producer's lease registry and returns a ``TensorRef``
whose ``key`` is a ``CudaIpcHandle`` (msgpack, base64url): the fields of torch's
``UntypedStorage._share_cuda_()`` spelled out one by one, the device named by UUID (device
indices differ between processes with different CUDA_VISIBLE_DEVICES), and who to tell when
done. No pickle: a consumer in any process rebuilds the tensor with torch's own
``rebuild_cuda_tensor`` from those plain fields.

``delete`` (called by the consumer once its own output is durably published) publishes the
key on ``df.ipc.release.<producer>``; the producer drops its reference and the memory returns
to its allocator. A consumer that crashes never releases, so each tensor also has a lease
(``DF_IPC_LEASE_S``): past it, the producer drops the tensor anyway. Torch's own IPC reference
count still guards the memory then: a block a consumer has mapped is reused only once that
consumer has let go of it, and one it mapped and never let go of (it crashed holding it) stays
in torch's IPC limbo until the producer process exits.

Bytes are not checksummed here (``checksum`` is empty): they never leave the device, and
hashing them would cost the device-to-host copy this transport exists to avoid. A producer
must not modify a tensor after ``put``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from typing import Generic, TypeVar

import msgpack
import nats
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from disagfusion.config import comma_list
from disagfusion.protocol import (
    IpcRelease, MissingBlobError, TensorRef, TransportName, ipc_release_subject, pack, unpack,
)
from disagfusion.transport.ref import DTYPE_NAMES, DTYPES

log = logging.getLogger(__name__)

class CudaIpcHandle(BaseModel):
    """Everything a consumer needs to map a producer's CUDA tensor, as msgpack-able fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int = 1
    producer: str
    """Producer id: releases go to ``df.ipc.release.<producer>``."""
    key: str
    """The tensor's name in the producer's registry."""
    device_uuid: str
    storage_handle: bytes | None
    """None for an empty storage (torch shares no allocation then)."""
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes | None
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool
    tensor_offset: int
    """In elements, within the storage."""
    stride: list[int]

    def encode(self) -> str:
        return base64.urlsafe_b64encode(msgpack.packb(self.model_dump(), use_bin_type=True)).decode("ascii")

    @classmethod
    def decode(cls, key: str) -> CudaIpcHandle:
        try:
            return cls.model_validate(msgpack.unpackb(base64.urlsafe_b64decode(key.encode("ascii")), raw=False))
        except (binascii.Error, ValueError, ValidationError, msgpack.ExtraData) as exc:
            raise MissingBlobError(f"not a CUDA IPC handle: {exc}") from exc


T = TypeVar("T")


class LeaseRegistry(Generic[T]):
    """What a producer keeps alive for consumers: released by key, or dropped when its lease
    runs out. Thread-safe: releases arrive on the NATS thread, puts on worker threads."""

    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic):
        self.lease_s = lease_s
        self._clock = clock
        self._held: dict[str, tuple[float, T]] = {}
        self._lock = threading.Lock()

    def hold(self, key: str, value: T) -> None:
        with self._lock:
            self._held[key] = (self._clock() + self.lease_s, value)

    def get(self, key: str) -> T | None:
        with self._lock:
            entry = self._held.get(key)
        return None if entry is None else entry[1]

    def release(self, key: str) -> T | None:
        with self._lock:
            entry = self._held.pop(key, None)
        return None if entry is None else entry[1]

    def expire(self) -> list[str]:
        """Drop everything whose lease has run out; return the keys dropped."""
        now = self._clock()
        with self._lock:
            expired = [key for key, (deadline, _) in self._held.items() if deadline <= now]
            for key in expired:
                del self._held[key]
        return expired

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)


class ReleaseChannel:
    """Release messages over core NATS, from blocking code: a private connection whose event
    loop runs in a daemon thread (the transports are called from worker threads, not a loop)."""

    def __init__(self, nats_url: str, producer: str, on_release: Callable[[str], None], sweep: Callable[[], object],
                 sweep_every_s: float, tls: ssl.SSLContext | None = None):
        self.producer = producer
        self._tls = tls
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="df-ipc-release", daemon=True)
        self._thread.start()
        self._on_release = on_release
        self._sweep = sweep
        self._sweep_every_s = sweep_every_s
        try:
            self._nc = self._call(self._connect(nats_url))
        except BaseException:
            self._stop_loop()
            raise
        self._sweeper = asyncio.run_coroutine_threadsafe(self._sweep_loop(), self._loop)

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    async def _connect(self, url: str):
        nc = await nats.connect(comma_list(url), name=f"ipc-release-{self.producer}", max_reconnect_attempts=-1,
                                 tls=self._tls)

        async def handle(msg) -> None:
            try:
                self._on_release(unpack(IpcRelease, msg.data).key)
            except Exception:
                log.exception("bad CUDA IPC release message on %s", msg.subject)

        await nc.subscribe(ipc_release_subject(self.producer), cb=handle)
        await nc.flush()
        return nc

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_every_s)
            try:
                await asyncio.to_thread(self._sweep)
            except Exception:
                log.exception("CUDA IPC lease sweep failed")

    def send(self, producer: str, key: str) -> None:
        async def publish() -> None:
            await self._nc.publish(ipc_release_subject(producer), pack(IpcRelease(key=key)))
            await self._nc.flush()

        self._call(publish())

    def close(self) -> None:
        self._sweeper.cancel()
        self._call(self._nc.drain())
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def device_of_uuid(uuid_: str) -> int:
    for index in range(torch.cuda.device_count()):
        if device_uuid(index) == uuid_:
            return index
    raise MissingBlobError(f"CUDA device {uuid_} is not visible to this process: the producer is on another GPU or host")


class CudaIpcTransport:
    name: TransportName = "cuda_ipc"

    def __init__(self, nats_url: str, lease_s: float, producer: str | None = None, tls: ssl.SSLContext | None = None):
        self.producer = producer or uuid.uuid4().hex
        self.registry: LeaseRegistry[torch.Tensor] = LeaseRegistry(lease_s)
        self.channel = ReleaseChannel(nats_url, self.producer, self._released, self._expire_leases,
                                      min(5.0, lease_s / 4), tls)

    def put(self, key: str, tensor: torch.Tensor) -> TensorRef:
        if not tensor.is_cuda:
            raise ValueError("the cuda_ipc transport hands over CUDA tensors only")
        storage = tensor.untyped_storage()
        (device, handle, size_bytes, offset_bytes, counter_handle, counter_offset, event_handle,
         event_sync_required) = storage._share_cuda_()
        ipc = CudaIpcHandle(
            producer=self.producer, key=key, device_uuid=device_uuid(device),
            storage_handle=handle, storage_size_bytes=size_bytes, storage_offset_bytes=offset_bytes,
            ref_counter_handle=counter_handle, ref_counter_offset=counter_offset,
            event_handle=event_handle, event_sync_required=event_sync_required,
            tensor_offset=tensor.storage_offset(), stride=list(tensor.stride()),
        )
        self.registry.hold(key, tensor)
        self._expire_leases()
        return TensorRef(transport="cuda_ipc", key=ipc.encode(), dtype=DTYPE_NAMES[tensor.dtype],
                         shape=list(tensor.shape), nbytes=tensor.numel() * tensor.element_size(), checksum="")

    def get(self, ref: TensorRef) -> torch.Tensor:
        ipc = CudaIpcHandle.decode(ref.key)
        if ipc.producer == self.producer:  # CUDA cannot open a process's own IPC handle
            tensor = self.registry.get(ipc.key)
            if tensor is None:
                raise MissingBlobError(f"CUDA tensor {ipc.key!r} was released or its lease ran out")
            return tensor
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        return rebuild_cuda_tensor(
            torch.Tensor, torch.Size(ref.shape), tuple(ipc.stride), ipc.tensor_offset, torch.storage.TypedStorage,
            DTYPES[ref.dtype], device_of_uuid(ipc.device_uuid), ipc.storage_handle, ipc.storage_size_bytes,
            ipc.storage_offset_bytes, False, ipc.ref_counter_handle, ipc.ref_counter_offset, ipc.event_handle,
            ipc.event_sync_required,
        )

    def delete(self, ref: TensorRef) -> None:
        ipc = CudaIpcHandle.decode(ref.key)
        if ipc.producer == self.producer:
            self._released(ipc.key)
        else:
            self.channel.send(ipc.producer, ipc.key)

    def _released(self, key: str) -> None:
        if self.registry.release(key) is not None:
            torch.cuda.ipc_collect()  # free blocks whose consumers have let go

    def sweep(self, ttl_s: float) -> int:
        """Drop the tensors whose lease ran out, however ``ttl_s`` compares: each tensor's lease
        (``lease_s``) was set when it was put, and the release channel sweeps on its own too."""
        return self._expire_leases()

    def _expire_leases(self) -> int:
        expired = self.registry.expire()
        if expired:
            log.warning("CUDA IPC: %d tensors never released by their consumers; dropped after their lease", len(expired))
            torch.cuda.ipc_collect()
        return len(expired)

    def close(self) -> None:
        self.channel.close()
