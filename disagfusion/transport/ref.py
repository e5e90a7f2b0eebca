"""TensorRef: how a tensor is named on the wire, and the raw-byte view of a tensor.

A stage output is a set of named tensors. Each is stored by a transport and described by a
``TensorRef``; the consumer asks the same transport kind for it back. The bytes are the
tensor's own memory in C order, so any language can rebuild it from dtype and shape.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import xxhash
from pydantic import BaseModel, ConfigDict

TransportName = Literal["inline", "shm", "redis", "cuda_ipc"]

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


class TensorRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    transport: TransportName
    key: str
    dtype: str
    shape: list[int]
    nbytes: int
    checksum: str
    """xxh3-64 of the raw bytes, hex. Fast enough (tens of GB/s) to check on every handoff."""
    data: bytes | None = None
    """The bytes themselves, for the inline transport only."""


class ChecksumError(RuntimeError):
    """The bytes a transport returned are not the bytes that were stored."""


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
