"""Two hosts on one engine: two compose projects with separate shm volumes (two shm domains).
Host A runs nats, redis, encoder and decoder; host B joins it with two dits
(deploy/compose.join.yaml). No setting says where anything runs: each hop's handoff follows
from the domains the workers advertise, and the refs on ``df.work.>`` show which one it took.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import numpy as np
import pytest
from PIL import Image

from compose_support import JOIN_OVERRIDE, Batch, ComposeStack, specs_for
from disagfusion.client import Client
from disagfusion.config import Settings
from disagfusion.protocol import JobSpec, StageTask, TensorRef, new_job_id, unpack

pytestmark = pytest.mark.timeout(900)

NO_INLINE = Path(__file__).parent / "no-inline.yaml"
ENV = {"DF_MODELS": "tiny", "DF_ACK_WAIT_S": "10"}  # a killed dit's tasks come back soon


class Hops:
    """The refs of every task published on ``df.work.>``, by the stage they are handed to."""

    def __init__(self) -> None:
        self.refs: list[tuple[str, TensorRef]] = []

    async def seen(self, msg) -> None:
        task = unpack(StageTask, msg.data)
        self.refs.extend((task.stage, ref) for ref in task.tensors.values())

    def ways(self, stage: str) -> set[tuple[str, str | None]]:
        """(transport, domain) of the refs handed to ``stage``."""
        return {(ref.transport, ref.domain) for s, ref in self.refs if s == stage}


@asynccontextmanager
async def watching(nats_url: str):
    hops = Hops()
    nc = await nats.connect(nats_url)
    await nc.subscribe("df.work.>", cb=hops.seen)
    await nc.flush()
    try:
        yield hops
    finally:
        await nc.drain()


async def images_and_hops(nats_url: str, specs: list[JobSpec]) -> tuple[dict[str, np.ndarray], Hops]:
    """Every job's image (by prompt and seed, which the two runs share) and the hops it took."""
    images = {}
    async with watching(nats_url) as hops, Client(Settings(nats_url=nats_url)) as client:
        by_id = {spec.job_id: spec for spec in specs}
        async for result in client.run_many(specs, timeout=300):
            assert result.status == "ok", result.error
            spec = by_id[result.job_id]
            images[f"{spec.prompt}/{spec.seed}"] = np.asarray(Image.open(io.BytesIO(await client.output(result))))
    return images, hops


def test_dits_on_a_second_host_hand_off_through_redis_and_survive_being_killed(
    compose_stack: Callable[..., ComposeStack], project_image: str
) -> None:
    specs = [JobSpec(prompt=f"two hosts {i}", seed=300 + i, steps=3, width=64, height=64 + 32 * (i % 2))
             for i in range(4)]

    # one host: the reference images, every hop through shm in that host's one domain
    a = compose_stack(services=["nats", "redis", "encoder", "dit", "decoder"], env=ENV, overrides=(NO_INLINE,))
    reference, hops = asyncio.run(images_and_hops(a.nats_url, specs))
    [(transport, domain)] = hops.ways("denoise") | hops.ways("decode")
    assert transport == "shm" and domain

    # host A keeps encoder and decoder; two dits on host B join it
    a.docker.compose.stop(services=["dit"])  # drained: it says it leaves
    b = compose_stack(services=["dit"], scales={"dit": 2}, overrides=(NO_INLINE, JOIN_OVERRIDE),
                      env={**ENV, "DF_JOIN_NATS_URL": a.nats_url, "DF_JOIN_REDIS_URL": a.redis_url})
    assert a.running("dit") == 0 and b.running("dit") == 2
    again = [spec.model_copy(update={"job_id": new_job_id()}) for spec in specs]
    two_hosts, hops = asyncio.run(images_and_hops(a.nats_url, again))
    for key, image in reference.items():
        assert np.array_equal(two_hosts[key], image), f"{key}: {np.count_nonzero(two_hosts[key] != image)} differ"
    # encoder (A) -> dit (B) and dit (B) -> decoder (A): both cross hosts, both through Redis
    assert hops.ways("denoise") == {("redis", None)}
    assert hops.ways("decode") == {("redis", None)}

    # host B's dits killed mid-batch, then one started again: nothing lost, nothing doubled
    def kill_and_restart() -> None:
        b.docker.compose.kill(services=["dit"])
        b.docker.compose.up(services=["dit"], scales={"dit": 1}, detach=True, wait=True, wait_timeout=300,
                            pull="never", quiet=True)

    batch = Batch(Settings(nats_url=a.nats_url), specs_for("host b killed", 16, steps=8))

    async def run_batch() -> Hops:
        async with watching(a.nats_url) as hops:
            await batch.run(when_some_done=kill_and_restart, after=2)
        return hops

    hops = asyncio.run(run_batch())
    batch.assert_each_job_done_once()
    assert b.running("dit") == 1
    # the inputs of the tasks the killed dits held were in Redis, which outlived them
    assert {way for stage in ("denoise", "decode") for way in hops.ways(stage)} == {("redis", None)}
