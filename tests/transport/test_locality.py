"""shm domains: one id per shm directory, producers that push to Redis when the next stage runs
elsewhere, and consumers that pull a ref of another domain from it (real NATS and Redis)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nats
import numpy as np
import pytest
import torch

from disagfusion.config import Settings
from disagfusion.protocol import DomainAd
from disagfusion.transport import Transports
from disagfusion.transport.locality import AD_TTL_S, Locality, UnreachableBlobError, shm_domain
from disagfusion.transport.ref import tensor_bytes
from disagfusion.transport.shm import DOMAIN_FILE, READY, PeerSlot, parse_key, unpack_word

NEXT = ("denoise", "tiny")


def test_one_domain_per_directory_whoever_asks_first(tmp_path: Path) -> None:
    shared = tmp_path / "shm"
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: shm_domain(shared), range(32)))
    assert len(ids) == 1
    assert shm_domain(tmp_path / "other") not in ids
    assert sorted(p.name for p in shared.iterdir()) == [DOMAIN_FILE]  # no temporary files left


def test_the_janitor_keeps_the_domain_file(tmp_path: Path) -> None:
    transports = Transports(Settings(shm_dir=tmp_path))
    domain = transports.locality.domain
    transports.shm.sweep(ttl_s=-1)  # everything counts as old
    assert shm_domain(tmp_path) == domain
    transports.close()


def test_consumers_elsewhere_known_from_their_ads_until_they_leave_or_go_quiet(tmp_path: Path) -> None:
    now = [0.0]
    locality = Locality("here", Transports(Settings(shm_dir=tmp_path)).shm, clock=lambda: now[0])
    assert locality.local_only(*NEXT)  # nobody known: local, and a consumer elsewhere pulls
    assert locality.heard(DomainAd(worker="dit-1", stage="denoise", models=["tiny"], domain="here"))
    assert locality.local_only(*NEXT)
    locality.heard(DomainAd(worker="dit-2", stage="denoise", models=["tiny", "small"], domain="there"))
    assert not locality.local_only(*NEXT)
    assert locality.local_only("decode", "tiny") and locality.local_only("denoise", "other")
    assert not locality.heard(DomainAd(worker="dit-2", stage="denoise", models=["tiny"], domain="there", leaving=True))
    assert locality.local_only(*NEXT)
    locality.heard(DomainAd(worker="dit-3", stage="denoise", models=["tiny"], domain="there"))
    now[0] += AD_TTL_S + 1  # killed without a word
    assert locality.consumer_domains(*NEXT) == set()


class Worker:
    """A ``Transports`` whose ``Locality.serve`` runs on its own event loop and NATS
    connection, as in a stage worker."""

    def __init__(self, settings: Settings, name: str, stage: str):
        self.transports = Transports(settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.nc = self._call(nats.connect(settings.nats_url))
        self.serving = asyncio.run_coroutine_threadsafe(
            self.transports.locality.serve(self.nc, name, stage, ["tiny"]), self.loop
        )

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    def stop(self) -> None:
        if not self.serving.done():
            self.loop.call_soon_threadsafe(self.serving.cancel)
            try:
                self.serving.result(timeout=10)
            except BaseException:
                pass
            self._call(self.nc.drain())
        self.transports.close()

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def hosts(tmp_path: Path, nats_server: str, redis_server: str) -> Iterator[tuple[Worker, Worker]]:
    """An encoder on host A and a dit on host B: one NATS and Redis, separate shm directories."""
    settings = dict(nats_url=nats_server, redis_url=redis_server, inline_max_bytes=1024)
    a = Worker(Settings(shm_dir=tmp_path / "a", **settings), "encoder-a", "encode")
    b = Worker(Settings(shm_dir=tmp_path / "b", **settings), "dit-b", "denoise")
    yield a, b
    a.close()
    b.close()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_producer_pushes_to_redis_once_it_hears_of_a_consumer_elsewhere(hosts: tuple[Worker, Worker]) -> None:
    a, b = hosts
    wait_for(lambda: a.transports.locality.consumer_domains(*NEXT) == {b.transports.locality.domain})
    tensor = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    ref = a.transports.put("job1.encode.embeds", tensor, bound_for=NEXT)
    assert ref.transport == "redis" and ref.domain is None
    assert torch.equal(b.transports.get(ref), tensor)
    assert b.transports.locality.reads == {"redis": 1}
    # a stage nobody elsewhere serves stays in shm, named by its domain
    local = a.transports.put("job1.encode.other", tensor, bound_for=("decode", "tiny"))
    assert local.transport == "shm" and local.domain == a.transports.locality.domain


def test_a_ref_of_another_domain_is_pulled_in_checksummed_chunks_and_freed_there(
    hosts: tuple[Worker, Worker],
) -> None:
    a, b = hosts
    # 3 MiB and a bit: more than one chunk under NATS's default 1 MiB max payload
    tensor = torch.randn(3 * 1024 * 256 + 5, generator=torch.Generator().manual_seed(1))
    ref = a.transports.put("job2.encode.embeds", tensor)  # no destination: shm, as before the ads came
    assert ref.transport == "shm"
    got = b.transports.get(ref)
    assert np.array_equal(tensor_bytes(got), tensor_bytes(tensor))
    assert b.transports.locality.reads == {"pull": 1}

    slot = PeerSlot(a.transports.shm.directory / parse_key(ref.key)[0])
    assert unpack_word(slot.peek())[2] == READY
    b.transports.delete(ref)  # through a worker of domain A
    assert unpack_word(slot.peek())[2] != READY
    slot.close()


def test_a_ref_whose_domain_is_gone_is_unreachable(hosts: tuple[Worker, Worker]) -> None:
    a, b = hosts
    ref = a.transports.put("job3.encode.embeds", torch.ones(4096))
    a.stop()  # host A's workers are gone: nobody serves its domain
    with pytest.raises(UnreachableBlobError, match="no worker is left"):
        b.transports.get(ref)
    b.transports.delete(ref)  # nothing to free any more, and no error


def test_a_ref_of_another_domain_without_a_connection_is_unreachable(tmp_path: Path) -> None:
    a, b = Transports(Settings(shm_dir=tmp_path / "a")), Transports(Settings(shm_dir=tmp_path / "b"))
    ref = a.put("job4.encode.embeds", torch.ones(1 << 16))
    with pytest.raises(UnreachableBlobError, match="not connected"):
        b.get(ref)
    old = ref.model_copy(update={"domain": None})  # a ref from a producer that predates domains
    assert old.domain is None and torch.equal(a.get(old), torch.ones(1 << 16))
    a.close()
    b.close()
