"""Small tensors inside the message itself: the bytes ride in ``TensorRef.data``, so there is no
store to write, free or clean up, and a handoff costs no round trip to one."""

from __future__ import annotations

import torch

from disagfusion.protocol import TensorRef, TransportName
from disagfusion.transport.ref import describe, tensor_bytes, tensor_from_buffer, verify


class InlineTransport:
    name: TransportName = "inline"

    def put(self, key: str, tensor: torch.Tensor) -> TensorRef:
        raw = tensor_bytes(tensor)
        return describe(tensor, "inline", key, raw).model_copy(update={"data": raw.tobytes()})

    def get(self, ref: TensorRef) -> torch.Tensor:
        data = ref.data or b""
        verify(ref, data)
        return tensor_from_buffer(data, ref.dtype, ref.shape)

    def delete(self, ref: TensorRef) -> None:
        """Nothing to free: the bytes went away with the message."""

    def sweep(self, ttl_s: float) -> int:
        """Nothing can be orphaned: no bytes live outside a message."""
        return 0

    def close(self) -> None:
        """Nothing held open."""
