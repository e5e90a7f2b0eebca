"""EngramClient: Engram table rows for a model, from a local mapping of the arena (CXL
load/store semantics: the gather runs in this process) or from the engram_store service over
NATS. Both modes have one API, so a model does not know where its rows live.

``prefetch(token_ids)`` hashes on the client and starts the gathers in the background as soon
as the prompt is tokenized; ``wait(handle)`` returns each Engram layer's embeddings.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import ssl
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Protocol

import nats
import numpy as np
import torch
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from disagfusion.engram import wire
from disagfusion.errors import DisagFusionError
from disagfusion.engram.arena import Arena, ArenaDirectory, LookupRequestError, TableInfo, numpy_dtype
from disagfusion.engram.hashing import CompressionMap, NgramHasher
from disagfusion.protocol import ENGRAM_ARENAS_BUCKET, engram_lookup_subject, pack, unpack

ReplyMode = Literal["chunks", "shm"]


class EngramServiceError(DisagFusionError, RuntimeError):
    """The service could not be reached or did not answer in time."""


class RowSource(Protocol):
    directory: ArenaDirectory

    def gather(self, table: str, ids: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


_HUGE_PAGE = 2 << 20


class _ScratchFile:
    """A file in the service's scratch directory that the service writes a reply's rows into;
    it only grows, and stays mapped here."""

    def __init__(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = str(Path(directory) / f"{uuid.uuid4().hex}.rows")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self._map: mmap.mmap | None = None
        self.size = 0

    def reserve(self, nbytes: int) -> None:
        if nbytes > self.size:
            if self._map is not None:
                self._map.close()
            # Whole 2 MiB pages: hugetlbfs refuses other sizes, and tmpfs minds neither way.
            self.size = -(-max(nbytes, 2 * self.size) // _HUGE_PAGE) * _HUGE_PAGE
            os.ftruncate(self._fd, self.size)
            self._map = mmap.mmap(self._fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def rows(self, dtype: np.dtype, n: int, dim: int) -> np.ndarray:
        assert self._map is not None
        return np.frombuffer(self._map, dtype=dtype, count=n * dim).reshape(n, dim).copy()

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        os.close(self._fd)
        Path(self.path).unlink(missing_ok=True)


class RemoteRows:
    """Gathers through the engram_store service on NATS. A private event loop thread owns the
    connection so the blocking API can be called from any thread (the prefetch worker too)."""

    def __init__(self, nats_url: str, arena: str | None = None, reply: ReplyMode = "chunks", timeout_s: float = 10.0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.reply = reply
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="engram-nats", daemon=True)
        self._thread.start()
        try:
            self._nc: NatsClient = self._call(nats.connect(nats_url, connect_timeout=timeout_s, max_reconnect_attempts=3, tls=tls))
            try:
                descriptor = self._call(self._descriptor(arena))
            except BaseException:
                self._call(self._nc.close())
                raise
        except BaseException:
            self._stop_loop()
            raise
        self.descriptor = descriptor
        self._subject = engram_lookup_subject(descriptor.name)
        self.directory = ArenaDirectory.model_validate_json(descriptor.directory_json)
        self._scratch = _ScratchFile(descriptor.scratch_dir) if reply == "shm" else None
        self._scratch_lock = threading.Lock()

    def _call(self, coro):  # noqa: ANN001, ANN202 - any coroutine, its result
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _descriptor(self, arena: str | None) -> wire.ArenaDescriptor:
        try:
            kv = await self._nc.jetstream().key_value(ENGRAM_ARENAS_BUCKET)
            names = [arena] if arena else await kv.keys()
            if len(names) != 1:
                raise EngramServiceError(f"several arenas are published ({', '.join(sorted(names))}); name one")
            entry = await kv.get(names[0])
        except EngramServiceError:
            raise
        except Exception as exc:  # no bucket, no key, or JetStream off: say what to start
            raise EngramServiceError(
                f"arena {arena or '(any)'} is not published in KV bucket {ENGRAM_ARENAS_BUCKET}: "
                f"is engram_store running? ({type(exc).__name__}: {exc})"
            ) from exc
        return unpack(wire.ArenaDescriptor, entry.value)

    def gather(self, table: str, ids: np.ndarray) -> np.ndarray:
        info = self._info(table)
        flat = np.ascontiguousarray(ids, dtype="<i8").reshape(-1)
        parts = [
            self._request(info, flat[start : start + wire.MAX_IDS_PER_REQUEST])
            for start in range(0, max(flat.size, 1), wire.MAX_IDS_PER_REQUEST)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _info(self, table: str) -> TableInfo:
        try:
            return self.directory.table(table)
        except KeyError as exc:
            raise LookupRequestError(exc.args[0]) from None

    def _request(self, info: TableInfo, ids: np.ndarray) -> np.ndarray:
        if self._scratch is None:
            request = wire.LookupRequest(table=info.name, ids=ids.tobytes())
            return self._call(self._chunked(pack(request), info, ids.size))
        with self._scratch_lock:
            self._scratch.reserve(ids.size * info.row_bytes)
            request = wire.LookupRequest(table=info.name, ids=ids.tobytes(), reply="shm", shm_path=self._scratch.path)
            self._call(self._single(pack(request)))
            return self._scratch.rows(numpy_dtype(info.dtype), ids.size, info.dim)

    async def _single(self, payload: bytes) -> None:
        try:
            msg = await self._nc.request(self._subject, payload, timeout=self.timeout_s)
        except NoRespondersError:
            raise EngramServiceError(f"no engram_store service answers on {self._subject}") from None
        except NatsTimeoutError:
            raise EngramServiceError(f"engram_store did not answer within {self.timeout_s} s") from None
        _raise_for_status(msg.headers or {})

    async def _chunked(self, payload: bytes, info: TableInfo, n: int) -> np.ndarray:
        out = np.empty((n, info.dim), dtype=numpy_dtype(info.dtype))
        out_bytes = out.reshape(-1).view(np.uint8)
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        try:
            await self._nc.publish(self._subject, payload, reply=inbox)
            received, count = 0, 1
            while received < count:
                try:
                    msg = await sub.next_msg(timeout=self.timeout_s)
                except NatsTimeoutError:
                    raise EngramServiceError(f"engram_store did not answer within {self.timeout_s} s") from None
                headers = msg.headers or {}
                if headers.get("Status") == "503":
                    raise EngramServiceError(f"no engram_store service answers on {self._subject}")
                _raise_for_status(headers)
                index, count = (int(x) for x in headers[wire.CHUNK].split("/"))
                start = index * int(headers[wire.CHUNK_ROWS]) * info.row_bytes
                out_bytes[start : start + len(msg.data)] = np.frombuffer(msg.data, dtype=np.uint8)
                received += 1
        finally:
            await sub.unsubscribe()
        return out

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.close()
        self._call(self._nc.close())
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def _raise_for_status(headers: dict[str, str]) -> None:
    if headers.get(wire.STATUS) == "error":
        raise LookupRequestError(headers.get(wire.ERROR, "engram_store refused the lookup"))


class PrefetchHandle:
    """The rows of every Engram layer for one batch of prompts, on their way."""

    def __init__(self, future: Future[dict[int, torch.Tensor]]) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()


class EngramClient:
    """``lookup`` rows by id, or ``prefetch`` + ``wait`` a model's Engram embeddings by token ids."""

    def __init__(self, rows: RowSource, compression: CompressionMap | None = None) -> None:
        self.rows = rows
        self._gather = rows.gather  # bound once: lookups of a row or two are common and cheap
        self.directory = rows.directory
        self.layout = rows.directory.engram
        self.hasher: NgramHasher | None = self.layout.hasher.build() if self.layout else None
        self.compression_map = compression
        self._offsets = {layer: self.hasher.head_offsets(layer) for layer in self.hasher.layer_ids} if self.hasher else {}
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-prefetch")

    @classmethod
    def local(cls, path: str, compression: CompressionMap | None = None, verify: bool = True) -> EngramClient:
        return cls(Arena.open(path, verify=verify), compression)

    @classmethod
    def remote(
        cls,
        nats_url: str,
        arena: str | None = None,
        reply: ReplyMode = "chunks",
        compression: CompressionMap | None = None,
        timeout_s: float = 10.0,
        tls: ssl.SSLContext | None = None,
    ) -> EngramClient:
        return cls(RemoteRows(nats_url, arena, reply, timeout_s, tls), compression)

    def lookup(self, table: str, ids: np.ndarray | list[int]) -> np.ndarray:
        """Rows as an array of shape ``ids.shape + (dim,)`` in the table's dtype (bfloat16 rows
        as their uint16 bit patterns: numpy has no bfloat16; ``as_tensor`` reinterprets them).
        Unsigned ids of up to 32 bits take the fastest path through a local arena."""
        ids = np.asarray(ids)
        rows = self._gather(table, ids)
        return rows if ids.ndim == 1 else rows.reshape(*ids.shape, rows.shape[-1])

    def as_tensor(self, table: str, rows: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(rows)
        return tensor.view(torch.bfloat16) if self.directory.table(table).dtype == "bfloat16" else tensor

    def prefetch(self, token_ids: np.ndarray | torch.Tensor, compressed: bool = False) -> PrefetchHandle:
        """Start fetching every Engram layer's rows for ``token_ids`` [B, T] (tokenizer ids, or
        compressed ids with ``compressed=True``)."""
        if self.hasher is None:
            raise LookupRequestError("this arena has no Engram layout, so token ids cannot be hashed into rows")
        ids = np.asarray(token_ids.cpu() if isinstance(token_ids, torch.Tensor) else token_ids, dtype=np.int64)
        return PrefetchHandle(self._background.submit(self._embeddings, ids, compressed))

    def wait(self, handle: PrefetchHandle) -> dict[int, torch.Tensor]:
        """``{layer: [B, T, heads, dim]}``; raises what the fetch raised."""
        return handle._future.result()

    def _embeddings(self, ids: np.ndarray, compressed: bool) -> dict[int, torch.Tensor]:
        assert self.hasher is not None and self.layout is not None
        if not compressed:
            ids = self.compression()(ids)
        out = {}
        for layer, hashes in self.hasher.hash(ids).items():
            table = self.layout.layer_tables[layer]
            out[layer] = self.as_tensor(table, self.lookup(table, hashes + self._offsets[layer]))
        return out

    def compression(self) -> CompressionMap:
        """The tokenizer compression map: given, or read once from the arena's compression table."""
        if self.compression_map is None:
            table = self.layout.compression_table if self.layout else None
            if table is None:
                raise LookupRequestError("no compression map: pass one, or hash compressed ids (compressed=True)")
            info = self.directory.table(table)
            lookup = self.rows.gather(table, np.arange(info.rows)).reshape(-1)
            self.compression_map = CompressionMap(lookup, self.layout.hasher.compressed_vocab_size)
        return self.compression_map

    def close(self) -> None:
        self._background.shutdown(wait=True)
        self.rows.close()

    def __enter__(self) -> EngramClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
