"""Supervision of the embedded stack with the real stage services: a stage killed under
``disagfusion up`` comes back on its own and serves; ``DF_TRANSPORT`` set for ``up`` reaches the
services; and redis-server killed mid-run comes back from its append-only file, with every job
answered once and none failed (the workers retry their handoffs meanwhile)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis

from disagfusion.client import Client
from disagfusion.launcher import Launcher, alive
from disagfusion.protocol import RESULTS_STREAM, JobSpec


def restarted(launcher: Launcher, pid_of, old_pid: int, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while (proc := pid_of(launcher.state())).pid == old_pid or not alive(proc.pid):
        assert time.monotonic() < deadline, f"pid {old_pid} was not restarted"
        time.sleep(0.1)
    return proc


@pytest.mark.slow
async def test_killed_processes_come_back_and_no_job_is_lost(start_stack) -> None:
    launcher = start_stack(DF_TRANSPORT="redis", DF_INLINE_MAX_BYTES="0", DF_RESTART_DELAY_S="3")
    [dit] = launcher.state().services["dit"]
    os.kill(dit.pid, signal.SIGKILL)
    back = restarted(launcher, lambda s: s.services["dit"][0], dit.pid)
    assert back.restarts == 1
    launcher.wait_healthy(60)
    # The handoffs go through Redis, as DF_TRANSPORT=redis asked (compose.yaml says shm unless told).
    assert b"DF_TRANSPORT=redis" in Path(f"/proc/{back.pid}/environ").read_bytes().split(b"\0")

    specs = [JobSpec(prompt=f"through a redis restart {i}", seed=i, steps=2, width=64, height=64) for i in range(30)]
    old_redis = launcher.state().redis.pid
    async with Client(launcher.client_settings()) as client:
        # Redis is killed as the first result arrives (a fixed delay lost the race on a fast
        # machine: every job was done before it); the rest of the first half may be caught with
        # its handoffs in Redis, and the second half is submitted after the kill, so it runs
        # through the restarted server (down for DF_RESTART_DELAY_S).
        results = []
        async for result in client.run_many(specs[:15], timeout=120):
            if not results:
                os.kill(old_redis, signal.SIGKILL)  # then back from its append-only file
                killed_at = time.time()
            results.append(result)
        results += [r async for r in client.run_many(specs[15:], timeout=120)]
        info = await client._js.stream_info(RESULTS_STREAM, subjects_filter="df.results.>")
    assert [r.error for r in results if r.status != "ok"] == []
    assert sorted(r.job_id for r in results) == sorted(s.job_id for s in specs)
    assert set(info.state.subjects.values()) == {1}
    assert min(r.finished_at for r in results[15:]) > killed_at
    assert launcher.state().redis.restarts == 1
    assert redis.Redis.from_url(launcher.client_settings().redis_url).info("stats")["keyspace_hits"] > 0
