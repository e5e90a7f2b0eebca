"""Cross-host handoff: a Redis string per tensor, with a TTL so orphans expire on their own."""

from __future__ import annotations

import redis

import torch

from disagfusion.protocol import MissingBlobError, TensorRef, TransportName
from disagfusion.transport.ref import check_key, describe, tensor_bytes, tensor_from_buffer, verify

KEY_PREFIX = "df:blob:"
CONNECT_TIMEOUT_S = 5.0
IO_TIMEOUT_S = 60.0


class RedisTransport:
    name: TransportName = "redis"

    def __init__(self, url: str, ttl_s: int, tls: dict[str, str] | None = None):
        """``url``: ``redis://`` or, for TLS, ``rediss://``; ``tls``: redis-py's TLS options
        (``TransportSettings.redis_tls``)."""
        # Bounded waits: an unreachable Redis must raise (the worker retries the task later),
        # not hang a handoff thread forever.
        self.client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=IO_TIMEOUT_S,
                                           **(tls if url.startswith("rediss://") and tls else {}))
        self.ttl_s = ttl_s

    def put(self, key: str, tensor: torch.Tensor) -> TensorRef:
        raw = tensor_bytes(tensor)
        self.client.set(KEY_PREFIX + check_key(key), raw.data, ex=self.ttl_s)
        return describe(tensor, "redis", key, raw)

    def get(self, ref: TensorRef) -> torch.Tensor:
        data = self.client.get(KEY_PREFIX + check_key(ref.key))
        if data is None:
            raise MissingBlobError(f"tensor {ref.key!r} is not in Redis (expired or deleted)")
        verify(ref, data)
        return tensor_from_buffer(data, ref.dtype, ref.shape)

    def delete(self, ref: TensorRef) -> None:
        self.client.delete(KEY_PREFIX + check_key(ref.key))

    def sweep(self, ttl_s: float) -> int:
        """Always 0: every key was stored with the blob TTL, so Redis itself expires the ones
        nobody deleted, and no worker has to scan a store that other hosts share."""
        return 0

    def close(self) -> None:
        self.client.close()
