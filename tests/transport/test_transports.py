"""Every transport returns what it was given, bit for bit, and notices when it does not."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import pytest
import torch

from disagfusion.config import Settings
from disagfusion.transport import ChecksumError, MissingBlobError, Transports
from disagfusion.transport.redis import KEY_PREFIX
from disagfusion.transport.ref import tensor_bytes
from disagfusion.transport.shm import DOMAIN_FILE, parse_key

TENSORS = {
    "float32": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)),
    "float16": torch.randn(2, 7, generator=torch.Generator().manual_seed(1)).half(),
    "bfloat16": torch.randn(4, 4, generator=torch.Generator().manual_seed(2)).bfloat16(),
    "int64": torch.arange(-10, 10, dtype=torch.int64).reshape(4, 5),
    "bool": torch.tensor([[True, False, True]]),
    "scalar": torch.tensor(3.25),
    "empty": torch.zeros(0, 8),
    "noncontiguous": torch.arange(24, dtype=torch.float32).reshape(4, 6).t(),
}


@pytest.fixture(params=["shm", "redis"])
def transports(request, tmp_path: Path, redis_server: str) -> Transports:
    # inline_max_bytes=0 forces even empty tensors through the transport under test
    settings = Settings(transport=request.param, inline_max_bytes=0, shm_dir=tmp_path / "shm", redis_url=redis_server)
    t = Transports(settings)
    yield t
    t.close()


@pytest.mark.parametrize("name", TENSORS)
def test_round_trip_is_bit_exact(transports: Transports, name: str) -> None:
    tensor = TENSORS[name]
    ref = transports.put(f"job.test.{name}", tensor)
    assert ref.transport == transports.settings.transport
    back, again = transports.get(ref), transports.get(ref)  # shm: a view of the mapping, then a copy
    for got in (back, again):
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert np.array_equal(tensor_bytes(got), tensor_bytes(tensor))


def test_inline_round_trip() -> None:
    t = Transports(Settings())
    for name, tensor in TENSORS.items():
        ref = t.put(name, tensor)
        assert ref.transport == "inline" and ref.data is not None
        assert torch.equal(t.get(ref), tensor), name


def test_corrupted_bytes_are_detected_where_they_cross_a_boundary(redis_server: str) -> None:
    """Redis and inline bytes leave the process (a server, the network, a message) and are
    checksummed; shm bytes stay in this host's memory and are not (see transport/shm.py)."""
    t = Transports(Settings(transport="redis", inline_max_bytes=0, redis_url=redis_server))
    ref = t.put("job.test.corrupt", torch.arange(1000, dtype=torch.float32))
    key = KEY_PREFIX + ref.key
    t.redis.client.setrange(key, 17, bytes([t.redis.client.getrange(key, 17, 17)[0] ^ 0x01]))
    with pytest.raises(ChecksumError, match="corrupted"):
        t.get(ref)
    inline = t.inline.put("job.test.inline", torch.arange(10, dtype=torch.float32))
    flipped = bytes([inline.data[0] ^ 0x01]) + inline.data[1:]
    with pytest.raises(ChecksumError, match="corrupted"):
        t.get(inline.model_copy(update={"data": flipped}))
    t.close()


def test_deleted_blob_is_reported(transports: Transports) -> None:
    ref = transports.put("job.test.gone", torch.ones(100))
    transports.delete(ref)
    with pytest.raises(MissingBlobError, match="expired or deleted"):
        transports.get(ref)


def test_janitor_removes_only_expired_blobs(tmp_path: Path, age_slot) -> None:
    t = Transports(Settings(inline_max_bytes=0, shm_dir=tmp_path, blob_ttl_s=3600))
    old = t.put("old", torch.ones(4))
    new = t.put("new", torch.ones(4))
    age_slot(tmp_path, old, 7200)
    assert t.sweep() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [DOMAIN_FILE, parse_key(new.key)[0]]
    assert torch.equal(t.get(new), torch.ones(4))
    with pytest.raises(MissingBlobError, match="expired or deleted"):
        t.get(old)


def test_empty_gives_a_slot_only_where_put_would_use_shm(tmp_path: Path, redis_server: str) -> None:
    shm = Transports(Settings(inline_max_bytes=1024, shm_dir=tmp_path))
    small, large = shm.empty((16,), torch.float32), shm.empty((64, 64), torch.float32)
    assert not shm.shm._writing.get(small.data_ptr()) and shm.shm._writing.get(large.data_ptr())
    large.fill_(2.5)
    ref = shm.put("job.test.large", large)
    assert ref.transport == "shm" and not shm.shm._writing  # sealed in place, not copied
    assert torch.equal(shm.get(ref), torch.full((64, 64), 2.5))
    redis = Transports(Settings(transport="redis", inline_max_bytes=0, shm_dir=tmp_path, redis_url=redis_server))
    assert not redis.shm._writing.get(redis.empty((64, 64), torch.float32).data_ptr())
    shm.close()
    redis.close()
