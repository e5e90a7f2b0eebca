"""The Engram arena: one mapping that holds every table of an Engram model, laid out so that a
file on tmpfs/hugetlbfs/fsdax/famfs, a devdax character device and NUMA-bound anonymous memory
(a CXL expander in system-RAM mode) all hold the same bytes.

Layout (little-endian), every table starting on a 2 MiB boundary so huge pages and devdax
alignment both hold:

    0   magic  b"DFENGRM\\0"          8 bytes
    8   version                      u32
    12  reserved (0)                 u32
    16  directory length             u64
    24  directory xxh3-64            u64
    32  directory: UTF-8 JSON of ``ArenaDirectory`` (tables, offsets, checksums, Engram layout)
    2 MiB, 4 MiB, ...: table rows, row-major [rows, dim], C order

The magic is written last, so a half-built arena never opens. Readers map it read-only and
share one physical copy; nothing here copies a table.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import xxhash
from pydantic import BaseModel, ConfigDict, Field

from disagfusion.engram.hashing import NgramHasher
from disagfusion.errors import DisagFusionError
from disagfusion.engram.spec import RowDType

MAGIC = b"DFENGRM\0"
FORMAT_VERSION = 1
ALIGN = 2 * 1024 * 1024
_PREAMBLE = struct.Struct("<8sIIQQ")
DEFAULT_DIR = Path("/dev/shm/disagfusion-engram")
_MAX = np.maximum.reduce
_SMALL_BATCH = 16

# numpy has no bfloat16: its rows are held as uint16 and reinterpreted by torch.
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"),
}


class ArenaError(DisagFusionError, RuntimeError):
    """The arena cannot be opened or built as asked."""


class ArenaCorruptError(ArenaError):
    """The bytes in the arena are not the bytes it was built with."""


class LookupRequestError(DisagFusionError, ValueError):
    """A lookup that names no table of the arena or a row outside its table."""


class HasherConfig(BaseModel):
    """The arguments of ``NgramHasher``: what a client needs to turn token ids into row ids."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    compressed_vocab_size: int = Field(gt=0)
    engram_vocab_size: list[int]
    max_ngram_size: int = Field(ge=2)
    n_head_per_ngram: int = Field(ge=1)
    layer_ids: list[int]
    pad_id: int
    seed: int

    def build(self) -> NgramHasher:
        return NgramHasher(**self.model_dump())


class EngramLayout(BaseModel):
    """Which table holds which Engram layer: one table per layer, its heads concatenated in
    column order (order, then head), each head's rows starting at ``NgramHasher.head_offsets``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    hasher: HasherConfig
    layer_tables: dict[int, str]
    compression_table: str | None = None
    """int64 [tokenizer vocab, 1]: tokenizer id -> compressed id, when the arena carries one."""


class TableSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    dtype: RowDType
    rows: int = Field(gt=0)
    dim: int = Field(gt=0)

    @property
    def row_bytes(self) -> int:
        return self.dim * _NUMPY_DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


class TableInfo(TableSpec):
    offset: int
    checksum: str
    """xxh3-64 of the table's bytes, hex."""


class ArenaDirectory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tables: list[TableInfo]
    engram: EngramLayout | None = None

    def table(self, name: str) -> TableInfo:
        for info in self.tables:
            if info.name == name:
                return info
        raise KeyError(f"no table {name!r} (tables: {', '.join(t.name for t in self.tables)})")

    @property
    def total_bytes(self) -> int:
        return max([ALIGN] + [_align(t.offset + t.nbytes) for t in self.tables])


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def numpy_dtype(dtype: str) -> np.dtype:
    return _NUMPY_DTYPES[dtype]


# ---- where an arena lives ------------------------------------------------------------------

_DEVDAX = re.compile(r"^/dev/dax\d+\.\d+$")
_NUMA = re.compile(r"^numa:(\d+)(?::([A-Za-z0-9_.-]+))?$")


class Location(BaseModel):
    """``/dev/daxX.Y`` (devdax), ``numa:<node>[:name]`` (anonymous memory bound to a node; its
    readers open ``/proc/<owner pid>/fd/<fd>``), any other path (tmpfs, hugetlbfs, fsdax, famfs),
    or a bare name: ``/dev/shm/disagfusion-engram/<name>.arena``."""

    model_config = ConfigDict(frozen=True)
    kind: Literal["file", "devdax", "numa"]
    path: str
    numa_node: int | None = None

    @classmethod
    def parse(cls, text: str) -> Location:
        if m := _NUMA.match(text):
            return cls(kind="numa", path=m.group(2) or "engram-arena", numa_node=int(m.group(1)))
        if _DEVDAX.match(text):
            return cls(kind="devdax", path=text)
        if "/" not in text:  # a bare name: an arena in the default directory, on tmpfs
            return cls(kind="file", path=str(DEFAULT_DIR / f"{text}.arena"))
        return cls(kind="file", path=text)


def devdax_size(path: str) -> int:
    name = Path(path).name
    return int(Path(f"/sys/bus/dax/devices/{name}/size").read_text())


# ---- reading --------------------------------------------------------------------------------


class Arena:
    """A read-only mapping of an arena. ``table(name)`` is a zero-copy [rows, dim] view."""

    def __init__(self, path: str, buffer: mmap.mmap, directory: ArenaDirectory) -> None:
        self.path = path
        self._buffer = buffer
        self.directory = directory
        self._infos = {info.name: info for info in directory.tables}
        self._views: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, location: str, verify: bool = True, populate: bool = True) -> Arena:
        """Map ``location`` read-only. ``verify`` checks every table's checksum (reads it all
        once); ``populate`` pre-faults the page tables so the first lookups do not pay for it."""
        loc = Location.parse(location)
        if loc.kind == "numa":
            raise ArenaError(
                "a numa: arena lives in its owner's memory; open it through the path the owner "
                "publishes (/proc/<pid>/fd/<fd>)"
            )
        fd = os.open(loc.path, os.O_RDONLY)
        try:
            size = devdax_size(loc.path) if loc.kind == "devdax" else os.fstat(fd).st_size
            if size < ALIGN:
                raise ArenaError(f"{location} is {size} bytes, smaller than an arena header ({ALIGN})")
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
            buffer = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        arena = cls(location, buffer, read_directory(buffer, location))
        if arena.directory.total_bytes > size:
            buffer.close()
            raise ArenaCorruptError(
                f"{location} is truncated: its directory needs {arena.directory.total_bytes} bytes, it has {size}"
            )
        if verify:
            arena.verify()
        return arena

    def table(self, name: str) -> np.ndarray:
        view = self._views.get(name)
        if view is None:
            info = self.info(name)
            view = np.frombuffer(
                self._buffer, dtype=numpy_dtype(info.dtype), count=info.rows * info.dim, offset=info.offset
            ).reshape(info.rows, info.dim)
            self._views[name] = view
        return view

    def info(self, name: str) -> TableInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise LookupRequestError(f"no table {name!r} (tables: {', '.join(self._infos)})") from None

    def gather(self, name: str, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``ids`` (an integer array of any shape, flattened) of table ``name`` as [n, dim].
        Nothing reads outside a table, and an id < 0 or >= rows is an error.

        Unsigned ids of up to 32 bits are the fast path: they cannot be negative, and numpy's
        own bounds check (mode="raise") rejects the rest, so the gather is one ``ndarray.take``.
        Other ids pay for one reduction that checks both bounds first."""
        view = self._views.get(name)
        if view is None:
            view = self.table(name)
        flat = ids.reshape(-1)
        dtype = flat.dtype
        if out is None and dtype.kind == "u" and dtype.itemsize <= 4:
            try:
                return view.take(flat, axis=0, mode="raise")
            except IndexError:
                self._raise_out_of_range(name, flat)
        if dtype.kind not in "iu":
            if flat.size:
                raise LookupRequestError(f"row ids must be integers, not {dtype}")
            flat = flat.astype(np.int64)
        elif flat.size <= _SMALL_BATCH:
            # For a few ids plain Python beats a numpy reduction, and batch-1 lookups are common.
            values = flat.tolist()
            if values and (min(values) < 0 or max(values) >= view.shape[0]):
                self._raise_out_of_range(name, flat)
        else:
            # Seen as unsigned, a negative id is huge, so one max() checks both bounds.
            wide = flat if dtype.itemsize == 8 else flat.astype(np.int64)
            if _MAX(wide.view(np.uint64)) >= view.shape[0]:
                self._raise_out_of_range(name, flat)
        # mode="clip" skips numpy's per-element bounds branch (checked above) and, unlike
        # "raise", writes straight into ``out`` rather than through a buffer.
        return view.take(flat, axis=0, out=out, mode="clip")

    def _raise_out_of_range(self, name: str, flat: np.ndarray) -> None:
        rows = self._infos[name].rows
        bad = flat[(flat < 0) | (flat >= rows)][0]
        raise LookupRequestError(f"row id {bad} is out of range for table {name!r} (rows 0..{rows - 1})")

    def verify(self) -> None:
        for info in self.directory.tables:
            got = xxhash.xxh3_64_hexdigest(memoryview(self._buffer)[info.offset : info.offset + info.nbytes])
            if got != info.checksum:
                raise ArenaCorruptError(
                    f"table {info.name!r} in {self.path} is corrupted: checksum {got}, built with {info.checksum}"
                )

    def close(self) -> None:
        """Unmap now, or, while a caller still holds a table view, when the last view goes."""
        self._views.clear()
        try:
            self._buffer.close()
        except BufferError:
            pass

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_directory(buffer: mmap.mmap | memoryview | bytes, where: str) -> ArenaDirectory:
    magic, version, _, length, digest = _PREAMBLE.unpack_from(buffer, 0)
    if magic != MAGIC:
        raise ArenaError(f"{where} is not an Engram arena (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise ArenaError(f"{where} has arena format version {version}; this build reads {FORMAT_VERSION}")
    if not 0 < length <= ALIGN - _PREAMBLE.size:
        raise ArenaCorruptError(f"{where} has a directory length of {length} bytes")
    raw = bytes(memoryview(buffer)[_PREAMBLE.size : _PREAMBLE.size + length])
    if xxhash.xxh3_64_intdigest(raw) != digest:
        raise ArenaCorruptError(f"{where} has a corrupted table directory (checksum mismatch)")
    return ArenaDirectory.model_validate_json(raw)


# ---- building -------------------------------------------------------------------------------


def plan(specs: list[TableSpec]) -> list[tuple[TableSpec, int]]:
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ArenaError(f"table names must be unique, got {names}")
    out, offset = [], ALIGN
    for spec in specs:
        out.append((spec, offset))
        offset = _align(offset + spec.nbytes)
    return out


def arena_size(layout: list[tuple[TableSpec, int]]) -> int:
    return max([ALIGN] + [_align(offset + spec.nbytes) for spec, offset in layout])


class ArenaBuilder:
    """A writable mapping being filled: ``table(name)`` views, then ``finish()`` seals it."""

    def __init__(self, buffer: mmap.mmap, layout: list[tuple[TableSpec, int]], engram: EngramLayout | None) -> None:
        self._buffer = buffer
        self._layout = {spec.name: (spec, offset) for spec, offset in layout}
        self._engram = engram

    def table(self, name: str) -> np.ndarray:
        spec, offset = self._layout[name]
        return np.frombuffer(self._buffer, dtype=numpy_dtype(spec.dtype), count=spec.rows * spec.dim, offset=offset).reshape(
            spec.rows, spec.dim
        )

    def finish(self) -> ArenaDirectory:
        tables = [
            TableInfo(
                **spec.model_dump(),
                offset=offset,
                checksum=xxhash.xxh3_64_hexdigest(memoryview(self._buffer)[offset : offset + spec.nbytes]),
            )
            for spec, offset in self._layout.values()
        ]
        directory = ArenaDirectory(tables=tables, engram=self._engram)
        raw = directory.model_dump_json().encode()
        if _PREAMBLE.size + len(raw) > ALIGN:
            raise ArenaError(f"the table directory ({len(raw)} bytes) does not fit in the {ALIGN}-byte header")
        self._buffer[_PREAMBLE.size : _PREAMBLE.size + len(raw)] = raw
        self._buffer[0 : _PREAMBLE.size] = _PREAMBLE.pack(
            b"\0" * 8, FORMAT_VERSION, 0, len(raw), xxhash.xxh3_64_intdigest(raw)
        )
        self._buffer.flush()
        self._buffer[0:8] = MAGIC
        self._buffer.flush()
        return directory


@contextmanager
def build_arena(
    location: str, specs: list[TableSpec], engram: EngramLayout | None = None
) -> Iterator[ArenaBuilder]:
    """Map a new arena writable; the caller fills ``builder.table(name)`` inside the block, and
    leaving it seals the arena. A file arena appears under its name only once sealed."""
    layout = plan(specs)
    size = arena_size(layout)
    loc = Location.parse(location)
    if loc.kind == "numa":
        raise ArenaError("numa: arenas are built by disagfusion.engram.build.build, which keeps the memory alive")
    if loc.kind == "devdax":
        available = devdax_size(loc.path)
        if size > available:
            raise ArenaError(f"{loc.path} holds {available} bytes; the arena needs {size}")
        fd = os.open(loc.path, os.O_RDWR)
        target, staging = loc.path, loc.path
    else:
        Path(loc.path).parent.mkdir(parents=True, exist_ok=True)
        target, staging = loc.path, f"{loc.path}.building.{os.getpid()}"
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, size)
    try:
        buffer = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        builder = ArenaBuilder(buffer, layout, engram)
        yield builder
        builder.finish()
        if staging != target:
            os.replace(staging, target)
    except BaseException:
        if staging != target and os.path.exists(staging):
            os.unlink(staging)
        raise
    finally:
        buffer.close()
