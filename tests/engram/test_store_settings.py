"""engram_store configured by settings alone, as compose runs it: it builds a missing arena
from DF_ENGRAM_SPEC and reports its health. A module of its own, so its nats-server has no
other engram_store: every arena built from a spec has a table named ``compression``, and all
services on one NATS answer one lookup subject."""

import time
from pathlib import Path

import numpy as np
import torch

from disagfusion.engram.arena import Arena
from disagfusion.engram.client import EngramClient
from disagfusion.engram.spec import EngramArenaSpec
from disagfusion.health import health_age
from tests.engram.conftest import start_engram_store, stop_engram_store


def test_a_missing_arena_is_built_from_the_spec_and_health_is_reported(
    nats_server: str, shm_arena_path: str, scratch_dir: str, tmp_path: Path
) -> None:
    """What compose runs: ``python -m services.engram_store`` with settings only."""
    health = tmp_path / "health"
    spec = EngramArenaSpec(engram_vocab=[101, 103], heads=2, dim=4, seed=11)
    env = {"DF_ENGRAM_ARENAS": shm_arena_path, "DF_ENGRAM_SPEC": spec.model_dump_json(), "DF_HEALTH_FILE": str(health)}
    proc = start_engram_store(nats_server, [], scratch_dir, env)
    try:
        with Arena.open(shm_arena_path) as arena:  # built, sealed and checksummed
            directory = arena.directory
            assert directory.engram is not None and directory.engram.compression_table == "compression"
            assert directory.engram.hasher.seed == 11 and directory.engram.hasher.n_head_per_ngram == 2
        deadline = time.monotonic() + 10
        while health_age(health) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert health.read_text().startswith(f"engram_store serving {Path(shm_arena_path).stem}")
        tokens = np.array([[104, 105, 33, 0]])  # ByT5 ids (bytes + 3) of "eb" and "!", then the pad
        with EngramClient.remote(nats_server, arena=Path(shm_arena_path).stem) as remote, EngramClient.local(
            shm_arena_path
        ) as local:
            got, want = remote.wait(remote.prefetch(tokens)), local.wait(local.prefetch(tokens))
        assert got.keys() == want.keys() == {0}
        assert torch.equal(got[0], want[0]) and got[0].shape == (1, 4, 4, 4)
    finally:
        stop_engram_store(proc)
