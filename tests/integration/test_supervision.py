"""Supervision of the embedded stack with the real stage services: a stage killed under
``disagfusion up`` comes back on its own and serves, and ``DF_TRANSPORT`` set for ``up`` reaches
the services."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis

from disagfusion.client import Client
from disagfusion.launcher import alive
from disagfusion.protocol import JobSpec


@pytest.mark.slow
async def test_a_killed_stage_comes_back_and_serves_and_the_transport_override_takes_effect(start_stack) -> None:
    launcher = start_stack(DF_TRANSPORT="redis", DF_INLINE_MAX_BYTES="0")
    [dit] = launcher.state().services["dit"]
    os.kill(dit.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (back := launcher.state().services["dit"][0]).pid == dit.pid or not alive(back.pid):
        assert time.monotonic() < deadline, "the killed dit was not restarted"
        time.sleep(0.1)
    assert back.restarts == 1
    launcher.wait_healthy(60)
    async with Client(launcher.client_settings()) as client:
        result = await client.generate(JobSpec(prompt="after the kill", steps=2, width=64, height=64), timeout=60)
    assert result.status == "ok", result.error
    # The handoffs went through Redis, as DF_TRANSPORT=redis asked (compose.yaml says shm unless told).
    assert b"DF_TRANSPORT=redis" in Path(f"/proc/{back.pid}/environ").read_bytes().split(b"\0")
    assert redis.Redis.from_url(launcher.state().redis_url).info("stats")["keyspace_hits"] >= 2
