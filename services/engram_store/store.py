"""The engram_store service: maps its arenas, publishes one descriptor per arena in the
DF_ENGRAM_ARENAS key-value bucket, and answers lookups on df.engram.lookup.<arena> (a queue
group, so replicas share the load). Every request is checked before a byte is read: unknown tables,
out-of-range ids, malformed messages and scratch files outside the scratch directory get an
error reply naming the problem."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import mmap
import os
import signal
import socket
import stat
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.errors import BucketNotFoundError

from disagfusion import metrics
from disagfusion.bus import connect
from disagfusion.engram import wire
from disagfusion.engram.arena import Arena, LookupRequestError, Location, numpy_dtype
from disagfusion.engram.build import OwnedArena, build, from_source, from_spec
from disagfusion.engram.spec import EngramArenaSpec
from disagfusion.health import health_path, write_health
from disagfusion.protocol import ENGRAM_ARENAS_BUCKET, ENGRAM_QUEUE_GROUP, DecodeError, engram_lookup_subject, pack, unpack
from services.engram_store.config import EngramStoreSettings

log = logging.getLogger("engram_store")
_HEADER_ROOM = 4096
"""Bytes of a chunk message kept for NATS headers."""
_SCRATCH_MAPS = 64


def open_arena(entry: str, spec: EngramArenaSpec) -> OwnedArena:
    """``LOCATION`` maps a built arena, or builds one from ``spec`` where there is none yet (a
    missing file, or a ``numa:`` location); ``LOCATION<=SOURCE`` builds LOCATION from SOURCE."""
    if "<=" in entry:
        location, source = (part.strip() for part in entry.split("<=", 1))
        specs, fill, engram = from_source(source)
        return build(location, specs, fill, engram)
    loc = Location.parse(entry)
    if loc.kind == "numa" or (loc.kind == "file" and not Path(loc.path).exists()):
        # Seeded rows: replicas that race to build the same file build the same bytes, and the
        # file appears under its name only once sealed.
        log.info("building arena %s from DF_ENGRAM_SPEC %s", entry, spec.model_dump_json())
        return build(entry, *from_spec(spec))
    with Arena.open(entry, verify=False, populate=False) as arena:
        return OwnedArena(location=entry, reader_path=loc.path, directory=arena.directory)


def arena_name(owned: OwnedArena) -> str:
    loc = Location.parse(owned.location)
    stem = loc.path if loc.kind == "numa" else Path(loc.path).stem
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in stem)


class ScratchMaps:
    """Writable mappings of clients' scratch files, kept across requests (mapping a file and
    faulting its pages in costs more than the gather of a small batch)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        self._maps: OrderedDict[tuple[str, int, int], mmap.mmap] = OrderedDict()

    def rows(self, path: str, dtype: np.dtype, n: int, dim: int) -> np.ndarray:
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.directory):
            raise LookupRequestError(f"shm_path {path!r} is outside the scratch directory {self.directory}")
        try:
            st = resolved.stat()
        except OSError as exc:
            raise LookupRequestError(f"shm_path {path!r} cannot be used: {exc.strerror}") from None
        need = n * dim * dtype.itemsize
        if st.st_size < need:
            raise LookupRequestError(f"shm_path {path!r} holds {st.st_size} bytes; the reply needs {need}")
        key = (str(resolved), st.st_ino, st.st_size)
        buffer = self._maps.pop(key, None)
        if buffer is None:
            try:  # resolved already; O_NOFOLLOW refuses a link swapped in since
                fd = os.open(resolved, os.O_RDWR | os.O_NOFOLLOW)
            except OSError as exc:
                raise LookupRequestError(f"shm_path {path!r} cannot be used: {exc.strerror}") from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise LookupRequestError(f"shm_path {path!r} is not a regular file")
                buffer = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            while len(self._maps) >= _SCRATCH_MAPS:
                self._maps.popitem(last=False)[1].close()
        self._maps[key] = buffer
        return np.frombuffer(buffer, dtype=dtype, count=n * dim).reshape(n, dim)


class EngramStore:
    def __init__(self, settings: EngramStoreSettings, entries: list[str]) -> None:
        if not entries:
            raise SystemExit("engram_store needs at least one arena (--arena or DF_ENGRAM_ARENAS)")
        self.settings = settings
        self.owned = [open_arena(entry, settings.engram_spec) for entry in entries]
        names = [arena_name(o) for o in self.owned]
        if len(set(names)) != len(names):
            raise SystemExit(f"arena names (file stems) must be unique, got {names}")
        self.arenas = {name: Arena.open(o.reader_path, verify=True) for name, o in zip(names, self.owned, strict=True)}
        settings.engram_scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.scratch = ScratchMaps(settings.engram_scratch_dir)
        self.nc: NatsClient | None = None

    def descriptors(self) -> dict[str, wire.ArenaDescriptor]:
        return {
            name: wire.ArenaDescriptor(
                name=name,
                location=owned.location,
                reader_path=owned.reader_path,
                host=socket.gethostname(),
                directory_json=owned.directory.model_dump_json(),
                scratch_dir=str(self.settings.engram_scratch_dir),
            )
            for name, owned in zip(self.arenas, self.owned, strict=True)
        }

    async def start(self, nc: NatsClient) -> None:
        self.nc = nc
        js = nc.jetstream()
        try:
            kv = await js.key_value(ENGRAM_ARENAS_BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(bucket=ENGRAM_ARENAS_BUCKET, history=1)
        for name, descriptor in self.descriptors().items():
            await kv.put(name, pack(descriptor))
        for name, arena in self.arenas.items():
            await nc.subscribe(engram_lookup_subject(name), queue=ENGRAM_QUEUE_GROUP, cb=functools.partial(self.handle, arena, name=name))
            log.info("serving arena %s (tables %s) on %s", name, [t.name for t in arena.directory.tables], engram_lookup_subject(name))
        await nc.flush()  # the server knows the subscriptions before anyone is told we serve

    async def handle(self, arena: Arena, msg: Msg, *, name: str) -> None:
        if not msg.reply:
            log.warning("dropped a lookup without a reply subject")
            return
        started, outcome = time.perf_counter(), "error"
        try:
            metrics.ENGRAM_ROWS.labels(name).inc(await self._answer(arena, msg))
            outcome = "ok"
        except (DecodeError, LookupRequestError) as exc:
            await self._error(msg.reply, str(exc))
        except Exception as exc:  # a reply beats a client waiting out its timeout
            log.exception("lookup failed")
            await self._error(msg.reply, f"engram_store failed: {type(exc).__name__}: {exc}")
        finally:
            metrics.ENGRAM_LOOKUPS.labels(name, outcome).inc()
            metrics.ENGRAM_LOOKUP_SECONDS.labels(name).observe(time.perf_counter() - started)

    async def _answer(self, arena: Arena, msg: Msg) -> int:
        """Reply to one lookup; the rows it gathered."""
        assert self.nc is not None
        request = unpack(wire.LookupRequest, msg.data)
        info = arena.info(request.table)  # an unknown table is refused before the ids are read
        if len(request.ids) % 8:
            raise LookupRequestError(f"ids must be little-endian int64: {len(request.ids)} bytes is not a multiple of 8")
        ids = np.frombuffer(request.ids, dtype="<i8")
        if ids.size > wire.MAX_IDS_PER_REQUEST:
            raise LookupRequestError(f"{ids.size} ids in one request; at most {wire.MAX_IDS_PER_REQUEST}")
        shape = {wire.DTYPE: info.dtype, wire.SHAPE: f"{ids.size},{info.dim}"}
        if request.reply == "shm":
            if request.shm_path is None:
                raise LookupRequestError("reply 'shm' needs shm_path")
            out = self.scratch.rows(request.shm_path, numpy_dtype(info.dtype), ids.size, info.dim)
            arena.gather(request.table, ids, out=out)
            await self.nc.publish(msg.reply, b"", headers={wire.STATUS: "ok", **shape})
            return ids.size
        rows = arena.gather(request.table, ids)
        payload = memoryview(rows.reshape(-1).view(np.uint8))
        rows_per_chunk = max(1, (self.nc.max_payload - _HEADER_ROOM) // info.row_bytes)
        count = max(1, math.ceil(ids.size / rows_per_chunk))
        step = rows_per_chunk * info.row_bytes
        for index in range(count):
            headers = {wire.STATUS: "ok", wire.CHUNK: f"{index}/{count}", wire.CHUNK_ROWS: str(rows_per_chunk), **shape}
            await self.nc.publish(msg.reply, bytes(payload[index * step : (index + 1) * step]), headers=headers)
        return ids.size

    async def _error(self, reply: str, text: str) -> None:
        assert self.nc is not None
        # Header values are one line of text.
        headers = {wire.STATUS: "error", wire.ERROR: " ".join(text.split()), wire.CHUNK: "0/1", wire.CHUNK_ROWS: "0"}
        await self.nc.publish(reply, b"", headers=headers)

    async def stop(self) -> None:
        if self.nc is not None:
            try:
                kv = await self.nc.jetstream().key_value(ENGRAM_ARENAS_BUCKET)
                for name in self.arenas:
                    await kv.delete(name)
            finally:
                await self.nc.drain()
        for arena in self.arenas.values():
            arena.close()
        for owned in self.owned:
            if owned.numa_fd is not None:
                os.close(owned.numa_fd)


async def serve(settings: EngramStoreSettings, entries: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engram_store %(levelname)s %(message)s")
    store = EngramStore(settings, entries)
    metrics.serve(settings, "engram_store")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    bus = await connect(settings, "engram_store")
    await store.start(bus.nc)
    heartbeat = asyncio.create_task(_heartbeat(bus.nc, settings, f"engram_store serving {', '.join(store.arenas)}"))
    print("engram_store ready", flush=True)
    await stopping.wait()
    heartbeat.cancel()
    await store.stop()


async def _heartbeat(nc: NatsClient, settings: EngramStoreSettings, detail: str) -> None:
    """The container HEALTHCHECK's file, touched only while connected: lookups are served."""
    path = health_path()
    while True:
        if nc.is_connected:
            await asyncio.to_thread(write_health, path, detail)
        await asyncio.sleep(min(settings.heartbeat_s, 5.0))
