"""Building arenas: from seeded random rows, from a safetensors file, or sized for an Engram
hasher; at a file path, on a devdax device, or in memory bound to a NUMA node."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open

from disagfusion.engram.arena import (
    Arena,
    ArenaBuilder,
    ArenaDirectory,
    ArenaError,
    EngramLayout,
    HasherConfig,
    Location,
    RowDType,
    TableSpec,
    arena_size,
    build_arena,
    plan,
)
from disagfusion.engram.hashing import CompressionMap, Tokenizer
from disagfusion.engram.spec import BYT5, EngramArenaSpec

Filler = Callable[[ArenaBuilder], None]
"""Writes the rows of every table into a builder's views."""


class OwnedArena(BaseModel):
    """What a builder hands back: where readers open it, and what it holds."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    location: str
    reader_path: str
    """Path readers open read-only: the file, the devdax device, or /proc/<pid>/fd/<fd> (numa)."""
    directory: ArenaDirectory
    numa_fd: int | None = None
    """The memfd holding a numa: arena; closing it (with every mapping) frees the memory."""


class _Libnuma:
    """The two libnuma calls the NUMA mode needs, through ctypes (no extra dependency)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("numa")
        if name is None:
            raise ArenaError("NUMA-bound arenas need libnuma (apt-get install libnuma1)")
        self.lib = ctypes.CDLL(name)
        self.lib.numa_available.restype = ctypes.c_int
        self.lib.numa_max_node.restype = ctypes.c_int
        self.lib.numa_tonode_memory.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if self.lib.numa_available() < 0:
            raise ArenaError("this kernel has no NUMA support (numa_available() < 0)")

    def bind(self, address: int, size: int, node: int) -> None:
        if not 0 <= node <= self.lib.numa_max_node():
            raise ArenaError(f"NUMA node {node} does not exist (max node {self.lib.numa_max_node()})")
        self.lib.numa_tonode_memory(address, size, node)


def _buffer_address(buf: mmap.mmap) -> int:
    view = np.frombuffer(buf, dtype=np.uint8, count=1)
    address = view.ctypes.data
    del view
    return address


def build_numa_arena(node: int, name: str, specs: list[TableSpec], engram: EngramLayout | None, fill: Filler) -> OwnedArena:
    """An arena in anonymous memory bound to ``node`` (how a CXL expander in system-RAM mode
    shows up: a CPU-less NUMA node). It lives as long as the returned fd stays open."""
    numa = _Libnuma()
    layout = plan(specs)
    size = arena_size(layout)
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    buffer = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        # Bind before the first touch: shmem pages take the policy of the object when allocated.
        numa.bind(_buffer_address(buffer), size, node)
        builder = ArenaBuilder(buffer, layout, engram)
        fill(builder)
        directory = builder.finish()
    finally:
        buffer.close()
    return OwnedArena(location=f"numa:{node}:{name}", reader_path=f"/proc/{os.getpid()}/fd/{fd}", directory=directory, numa_fd=fd)




_RANDOM_CHUNK_ROWS = 1 << 16


def random_filler(specs: list[TableSpec], seed: int, scale: float = 0.02) -> Filler:
    """Seeded N(0, scale²) rows (integer tables get ids below their row count), generated in
    chunks straight into the mapping so a 4 GiB table never needs a second copy in memory."""

    def fill(builder: ArenaBuilder) -> None:
        for index, spec in enumerate(specs):
            rng = np.random.default_rng([seed, index])
            view = builder.table(spec.name)
            for start in range(0, spec.rows, _RANDOM_CHUNK_ROWS):
                stop = min(spec.rows, start + _RANDOM_CHUNK_ROWS)
                if spec.dtype == "int64":
                    view[start:stop] = rng.integers(0, spec.rows, size=(stop - start, spec.dim))
                    continue
                chunk = rng.standard_normal((stop - start, spec.dim), dtype=np.float32) * np.float32(scale)
                if spec.dtype == "bfloat16":
                    view[start:stop] = torch.from_numpy(chunk).to(torch.bfloat16).view(torch.uint16).numpy()
                else:
                    view[start:stop] = chunk

    return fill


def safetensors_specs(path: str) -> list[TableSpec]:
    specs = []
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            shape = sl.get_shape()
            dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}.get(sl.get_dtype())
            if dtype is None or len(shape) not in (1, 2):
                raise ArenaError(
                    f"{path}: tensor {name!r} is {sl.get_dtype()} {shape}; tables are 1-D or 2-D F32/F16/BF16/I64"
                )
            specs.append(TableSpec(name=name, dtype=dtype, rows=shape[0], dim=shape[1] if len(shape) == 2 else 1))
    return specs


def safetensors_filler(path: str) -> Filler:
    def fill(builder: ArenaBuilder) -> None:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if tensor.dtype == torch.bfloat16:
                    tensor = tensor.view(torch.uint16)
                view = builder.table(name)
                view[...] = tensor.numpy().reshape(view.shape)

    return fill


def engram_specs(hasher_config: HasherConfig, dim: int, dtype: RowDType, prefix: str = "engram") -> tuple[list[TableSpec], EngramLayout]:
    """One table per Engram layer sized for the hasher's heads (``dim`` per head)."""
    hasher = hasher_config.build()
    layer_tables = {layer: f"{prefix}.layer{layer}" for layer in hasher.layer_ids}
    specs = [TableSpec(name=layer_tables[layer], dtype=dtype, rows=hasher.table_rows(layer), dim=dim) for layer in hasher.layer_ids]
    return specs, EngramLayout(hasher=hasher_config, layer_tables=layer_tables)


def build(location: str, specs: list[TableSpec], fill: Filler, engram: EngramLayout | None = None) -> OwnedArena:
    """Build at ``location`` (file, devdax or numa:) and say where readers find it."""
    loc = Location.parse(location)
    if loc.kind == "numa":
        return build_numa_arena(loc.numa_node or 0, loc.path, specs, engram, fill)
    with build_arena(location, specs, engram) as builder:
        fill(builder)
    with Arena.open(loc.path, verify=False, populate=False) as arena:
        directory = arena.directory
    return OwnedArena(location=location, reader_path=loc.path, directory=directory)



def arena_copy_filler(path: str) -> Filler:
    def fill(builder: ArenaBuilder) -> None:
        with Arena.open(path) as source:
            for info in source.directory.tables:
                builder.table(info.name)[...] = source.table(info.name)

    return fill


def load_tokenizer(name: str) -> Tokenizer:
    """``byt5`` (the presets' tokenizer) or a tokenizer directory."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    return ByT5Tokenizer() if name == BYT5 else AutoTokenizer.from_pretrained(name)


def from_spec(spec: EngramArenaSpec) -> tuple[list[TableSpec], Filler, EngramLayout]:
    """Tables, filler and Engram layout of a fresh arena: seeded random rows, and the
    tokenizer's compression map when the spec names a tokenizer."""
    compression = CompressionMap.from_tokenizer(load_tokenizer(spec.tokenizer)) if spec.tokenizer else None
    if compression is not None:
        compressed_vocab, pad_id = compression.compressed_vocab_size, int(compression.lookup[spec.pad_id])
    elif spec.compressed_vocab is None:
        raise ArenaError("an Engram arena needs a tokenizer or a compressed vocabulary size")
    else:
        compressed_vocab, pad_id = spec.compressed_vocab, spec.pad_id
    config = HasherConfig(
        compressed_vocab_size=compressed_vocab, engram_vocab_size=spec.engram_vocab, max_ngram_size=spec.max_ngram,
        n_head_per_ngram=spec.heads, layer_ids=spec.layers, pad_id=pad_id, seed=spec.seed,
    )
    specs, layout = engram_specs(config, dim=spec.dim, dtype=spec.dtype)
    random_rows = random_filler(specs, spec.seed, spec.scale)
    if compression is None:
        return specs, random_rows, layout
    specs.append(TableSpec(name="compression", dtype="int64", rows=len(compression.lookup), dim=1))

    def fill(builder: ArenaBuilder) -> None:
        random_rows(builder)
        builder.table("compression")[:, 0] = compression.lookup

    return specs, fill, layout.model_copy(update={"compression_table": "compression"})


def from_source(source: str) -> tuple[list[TableSpec], Filler, EngramLayout | None]:
    """Tables, filler and Engram layout from a ``.safetensors`` file or an existing arena (to
    load an arena built on disk into a NUMA node, say)."""
    if source.endswith(".safetensors"):
        return safetensors_specs(source), safetensors_filler(source), None
    with Arena.open(source, verify=False, populate=False) as arena:
        directory = arena.directory
    specs = [TableSpec(**info.model_dump(include=set(TableSpec.model_fields))) for info in directory.tables]
    return specs, arena_copy_filler(source), directory.engram
