"""engram_store as a real process on a real nats-server, read by EngramClient in remote mode."""

import asyncio
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgpack
import nats
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from disagfusion.engram import wire
from disagfusion.engram.arena import Arena, LookupRequestError, TableSpec
from disagfusion.engram.build import build, random_filler
from disagfusion.engram.client import EngramClient, EngramServiceError
from disagfusion.engram.spec import EngramArenaSpec
from disagfusion.health import health_age
from disagfusion.launcher import free_port
from disagfusion.protocol import ENGRAM_ARENAS_BUCKET, engram_lookup_subject, unpack
from tests.engram.conftest import new_arena_path, start_engram_store, stop_engram_store
from tests.engram.test_client import engram_arena, expected_embeddings

WIDE = TableSpec(name="wide", dtype="float16", rows=200_000, dim=32)


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def served(nats_server: str, scratch_dir: str, metrics_port: int) -> Iterator[tuple[str, str]]:
    """One service for the module: starting one costs seconds."""
    engram_path, wide_path = str(new_arena_path()), str(new_arena_path())
    engram_arena(engram_path)
    build(wide_path, [WIDE], random_filler([WIDE], seed=9))
    proc = start_engram_store(nats_server, [engram_path, wide_path], scratch_dir,
                              {"DF_METRICS_PORT": str(metrics_port)})
    try:
        yield engram_path, wide_path
    finally:
        stop_engram_store(proc)
        os.unlink(engram_path)
        os.unlink(wide_path)


@pytest.mark.parametrize("reply", ["chunks", "shm"])
def test_remote_rows_equal_local_rows(nats_server: str, served: tuple[str, str], reply: str) -> None:
    engram_path, wide_path = served
    rng = np.random.default_rng(1)
    # 70000 fp16 rows of 64 bytes: 4.3 MiB, more than one request and several 1 MiB chunks.
    ids = rng.integers(0, WIDE.rows, 70_000)
    token_ids = rng.integers(0, 80, (2, 11))
    with EngramClient.remote(nats_server, arena=Path(wide_path).stem, reply=reply) as wide, EngramClient.local(
        wide_path
    ) as local:
        np.testing.assert_array_equal(wide.lookup("wide", ids), local.lookup("wide", ids))
        np.testing.assert_array_equal(wide.lookup("wide", []), np.empty((0, 32), np.float16))
    name = Path(engram_path).stem
    with EngramClient.remote(nats_server, arena=name, reply=reply) as client:
        got = client.wait(client.prefetch(token_ids))
    want = expected_embeddings(engram_path, token_ids % 50)
    for layer in want:
        np.testing.assert_array_equal(got[layer].numpy(), want[layer])


@pytest.mark.parametrize("reply", ["chunks", "shm"])
def test_service_refuses_bad_ids_and_tables(nats_server: str, served: tuple[str, str], reply: str) -> None:
    name = Path(served[1]).stem
    with EngramClient.remote(nats_server, arena=name, reply=reply) as client:
        with pytest.raises(LookupRequestError, match=f"row id {WIDE.rows} is out of range for table 'wide'"):
            client.lookup("wide", [1, WIDE.rows])
        with pytest.raises(LookupRequestError, match="row id -5 is out of range"):
            client.lookup("wide", [-5])
        with pytest.raises(LookupRequestError, match="no table 'missing'"):
            client.lookup("missing", [0])
        # The service still answers after refusing.
        assert client.lookup("wide", [0]).shape == (1, 32)


async def raw_request(nats_url: str, arena: str, payload: bytes) -> dict[str, str]:
    nc = await nats.connect(nats_url)
    try:
        msg = await nc.request(engram_lookup_subject(arena), payload, timeout=10)
        return msg.headers or {}
    finally:
        await nc.close()


@pytest.mark.parametrize(
    ("request_map", "error"),
    [
        (None, "not valid msgpack"),
        ({"v": 1, "table": "wide", "ids": b"\x00" * 7}, "not a multiple of 8"),
        ({"v": 1, "table": "missing", "ids": b""}, "no table 'missing'"),
        ({"v": 1, "ids": b""}, "table"),
        ({"v": 99, "table": "wide", "ids": b""}, "schema version 99"),
        ({"v": 1, "table": "wide", "ids": b"\x00" * 8 * (wire.MAX_IDS_PER_REQUEST + 1)}, "at most 65536"),
        ({"v": 1, "table": "wide", "ids": b"\x00" * 8, "reply": "shm"}, "needs shm_path"),
        ({"v": 1, "table": "wide", "ids": b"\x00" * 8, "reply": "shm", "shm_path": "/etc/passwd"}, "outside the scratch directory"),
        ({"v": 1, "table": "wide", "ids": b"\x00" * 8, "reply": "shm", "shm_path": "/dev/shm/../etc/x"}, "outside the scratch directory"),
    ],
)
def test_malformed_requests_get_error_replies(nats_server: str, served: tuple[str, str], request_map, error: str) -> None:  # noqa: ANN001
    payload = b"\xc1garbage" if request_map is None else msgpack.packb(request_map, use_bin_type=True)
    headers = asyncio.run(raw_request(nats_server, Path(served[1]).stem, payload))
    assert headers[wire.STATUS] == "error"
    assert error in headers[wire.ERROR]


def test_descriptors_are_published_and_withdrawn(nats_server: str, shm_arena_path: str, scratch_dir: str) -> None:
    engram_arena(shm_arena_path)
    name = Path(shm_arena_path).stem

    async def descriptor() -> wire.ArenaDescriptor | None:
        nc = await nats.connect(nats_server)
        try:
            kv = await nc.jetstream().key_value(ENGRAM_ARENAS_BUCKET)
            try:
                return unpack(wire.ArenaDescriptor, (await kv.get(name)).value)
            except nats.js.errors.KeyNotFoundError:
                return None
        finally:
            await nc.close()

    proc = start_engram_store(nats_server, [shm_arena_path], scratch_dir)
    try:
        published = asyncio.run(descriptor())
        assert published is not None and published.reader_path == shm_arena_path
        with Arena.open(shm_arena_path) as arena:
            assert published.directory_json == arena.directory.model_dump_json()
    finally:
        stop_engram_store(proc)
    assert asyncio.run(descriptor()) is None


def test_an_unpublished_arena_is_a_clear_error(nats_server: str) -> None:
    with pytest.raises(EngramServiceError, match="arena"):
        EngramClient.remote(nats_server, arena="never-published", timeout_s=2)


def test_cli_lookup_through_the_service(nats_server: str, served: tuple[str, str]) -> None:
    from typer.testing import CliRunner

    from disagfusion_cli.engram import app as engram_app

    wide_path = served[1]
    result = CliRunner().invoke(engram_app, ["lookup", "wide", "7", "--nats", nats_server, "--name", Path(wide_path).stem])
    assert result.exit_code == 0, result.output
    with Arena.open(wide_path) as arena:
        assert json.loads(result.output)["row"] == arena.table("wide")[7].astype(np.float32).tolist()


def test_a_missing_arena_is_built_from_the_spec_and_health_is_reported(
    nats_server: str, served: tuple[str, str], shm_arena_path: str, scratch_dir: str, tmp_path: Path
) -> None:
    """What compose runs: ``python -m services.engram_store`` with settings only. The store of
    ``served`` runs beside it with its own (80-row) ``compression`` table: each arena has its
    own lookup subject, so the lookups below reach the right one."""
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


def test_lookups_are_counted_on_its_metrics_endpoint(nats_server: str, served: tuple[str, str],
                                                   metrics_port: int) -> None:
    name = Path(served[1]).stem

    def scrape() -> dict[tuple[str, str], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
            families = text_string_to_metric_families(answer.read().decode())
        return {(s.name, s.labels.get("outcome", "")): s.value for f in families for s in f.samples
                if s.labels.get("arena") == name}

    before = scrape()
    with EngramClient.remote(nats_server, arena=name) as client:
        client.lookup("wide", [1, 2, 3])
        with pytest.raises(LookupRequestError):
            client.lookup("wide", [WIDE.rows])
    after = scrape()
    for key, moved in {("disagfusion_engram_lookups_total", "ok"): 1, ("disagfusion_engram_lookups_total", "error"): 1,
                       ("disagfusion_engram_rows_total", ""): 3, ("disagfusion_engram_lookup_seconds_count", ""): 2}.items():
        assert after.get(key, 0) - before.get(key, 0) == moved, key
