"""The raw-byte view of a tensor, as every transport stores it.

A stage output is a set of named tensors. Each is stored by a transport and described by a
``TensorRef`` (``disagfusion.protocol``); the consumer asks the same transport kind for it
back. The bytes are the tensor's own memory in C order, so any language can rebuild it from
dtype and shape.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import xxhash

from disagfusion.protocol import TENSOR_ITEMSIZES, ChecksumError, MissingBlobError, TensorRef, TransportName

# Wire names are numpy-style names, plus bfloat16 which numpy lacks.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
assert {name: torch.tensor([], dtype=t).element_size() for name, t in DTYPES.items()} == TENSOR_ITEMSIZES


BLOB_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}")
"""A producer's tensor key (``<job_id>.<stage>.<tensor>``): dot-separated tokens, so a key that
arrives in a message can name nothing but a blob (no ``/``, no ``..``, no glob or control bytes)."""


def check_key(key: str) -> str:
    """``key`` if it is a well-formed tensor key, else MissingBlobError (the task gets an error result)."""
    if not BLOB_KEY.fullmatch(key):
        raise MissingBlobError(f"tensor key {key!r} is malformed: dot-separated letters, digits, _ and - only")
    return key


def checksum(buf: memoryview | bytes | np.ndarray) -> str:
    return xxhash.xxh3_64_hexdigest(buf)


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a flat uint8 array (a view when the tensor is contiguous on CPU).

    Viewing as uint8 works for every dtype, bfloat16 included, which numpy cannot represent.
    """
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def tensor_from_buffer(buf: memoryview | bytes | bytearray, dtype: str, shape: list[int]) -> torch.Tensor:
    """Rebuild a tensor over ``buf`` without copying. ``buf`` must stay alive as long as the tensor;
    torch keeps a reference to it. A read-only buffer is copied once, since torch tensors are writable."""
    torch_dtype = DTYPES[dtype]
    if len(buf) == 0:
        return torch.empty(shape, dtype=torch_dtype)
    if isinstance(buf, bytes) or (isinstance(buf, memoryview) and buf.readonly):
        buf = bytearray(buf)
    return torch.frombuffer(buf, dtype=torch.uint8).view(torch_dtype).reshape(shape)


def describe(tensor: torch.Tensor, transport: TransportName, key: str, raw: np.ndarray) -> TensorRef:
    return TensorRef(
        transport=transport,
        key=key,
        dtype=DTYPE_NAMES[tensor.dtype],
        shape=list(tensor.shape),
        nbytes=raw.nbytes,
        checksum=checksum(raw),
    )


def verify(ref: TensorRef, buf: memoryview | bytes) -> None:
    if len(buf) != ref.nbytes or checksum(buf) != ref.checksum:
        raise ChecksumError(
            f"tensor {ref.key!r} from the {ref.transport} transport is corrupted "
            f"(expected {ref.nbytes} bytes with checksum {ref.checksum}, got {len(buf)} bytes "
            f"with checksum {checksum(buf)})"
        )
