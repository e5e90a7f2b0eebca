"""Pins and the scheduler's status in the DF_SCHEDULER bucket, on a real nats-server."""

from __future__ import annotations

import nats

from disagfusion.protocol import SCHEDULER_PINS_KEY, SchedulerStatus
from disagfusion.scheduler_state import read_pins, read_status, scheduler_bucket, update_pins, write_status


async def test_pins_are_added_and_released(nats_server: str, role_url) -> None:
    nc = await nats.connect(role_url(nats_server, "admin"))  # pins are the operator's (disagfusion scale)
    js = nc.jetstream()
    try:
        assert await scheduler_bucket(js) is None or await read_pins(await scheduler_bucket(js)) == {}
        assert await update_pins(js, {"dit": 3}, None) == {"dit": 3}
        assert await update_pins(js, {"encoder": 2}, None) == {"dit": 3, "encoder": 2}
        assert await update_pins(js, {}, ["dit"]) == {"encoder": 2}
        assert await update_pins(js, {"decoder": 1}, []) == {"decoder": 1}  # release all, then pin
        assert await read_pins(await scheduler_bucket(js)) == {"decoder": 1}
        await (await scheduler_bucket(js)).delete(SCHEDULER_PINS_KEY)
    finally:
        await nc.close()


async def test_status_round_trips_and_knows_when_it_is_stale(nats_server: str, role_url) -> None:
    nc = await nats.connect(role_url(nats_server, "scheduler"))
    js = nc.jetstream()
    try:
        kv = await scheduler_bucket(js, create=True)
        status = SchedulerStatus(t=1000.0, policy="hybrid", actuator="local", pool="slot:6", tick_s=5.0, stages=[])
        await write_status(kv, status)
        read = await read_status(js)
        assert read == status
        assert read.fresh(now=1010.0) and not read.fresh(now=1100.0)
    finally:
        await nc.close()
