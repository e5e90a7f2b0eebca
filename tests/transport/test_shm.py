"""The shm transport recycles the files of deleted large blobs, within its pool budget."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from disagfusion.transport.shm import FREE_PREFIX, RECYCLE_MIN_BYTES, ShmTransport

FLOATS = RECYCLE_MIN_BYTES // 4


def pooled(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith(FREE_PREFIX))


def test_deleted_blob_is_reused_by_the_next_put_of_its_size(tmp_path: Path) -> None:
    shm = ShmTransport(tmp_path)
    first = shm.put("a", torch.zeros(FLOATS))
    inode = (tmp_path / "a").stat().st_ino
    shm.delete(first)
    [name] = pooled(tmp_path)
    assert name.startswith(f"{FREE_PREFIX}{RECYCLE_MIN_BYTES}-") and not (tmp_path / "a").exists()
    other_size = shm.put("b", torch.ones(FLOATS + 1))  # a different size leaves the pool alone
    assert len(pooled(tmp_path)) == 1 and (tmp_path / "b").stat().st_ino != inode
    tensor = torch.arange(FLOATS, dtype=torch.float32)
    second = shm.put("c", tensor)
    assert pooled(tmp_path) == [] and (tmp_path / "c").stat().st_ino == inode
    assert torch.equal(shm.get(second), tensor)  # every byte was overwritten
    shm.delete(other_size)
    assert len(pooled(tmp_path)) == 1


def test_small_blobs_and_blobs_beyond_the_budget_are_unlinked(tmp_path: Path) -> None:
    shm = ShmTransport(tmp_path, pool_bytes=RECYCLE_MIN_BYTES)
    small = shm.put("small", torch.zeros(16))
    shm.delete(small)
    refs = [shm.put(f"big{i}", torch.zeros(FLOATS)) for i in range(2)]
    for ref in refs:
        shm.delete(ref)
    assert len(pooled(tmp_path)) == 1 and not [n for n in os.listdir(tmp_path) if not n.startswith(FREE_PREFIX)]


def test_janitor_removes_pooled_files_left_unused(tmp_path: Path) -> None:
    shm = ShmTransport(tmp_path)
    shm.delete(shm.put("a", torch.zeros(FLOATS)))
    [name] = pooled(tmp_path)
    past = time.time() - 7200
    os.utime(tmp_path / name, (past, past))
    assert shm.remove_expired(3600) == 1 and pooled(tmp_path) == []
