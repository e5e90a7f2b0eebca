"""Resumable denoising with real processes: a DiT SIGKILLed at step 15 of 20 leaves a step-15
checkpoint, and the instance its task is redelivered to (the other replica, or the killed one
restarted by the launcher) resumes there, with a ``resumed`` event, and the image is bitwise
the one an uninterrupted run of the same spec makes; the checkpoint is gone afterwards."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from nats.js.errors import KeyNotFoundError

from disagfusion import bus
from disagfusion.client import Client
from disagfusion.protocol import Checkpoint, JobSpec, MissingBlobError, ProgressEvent, checkpoint_key, unpack
from disagfusion.transport import Transports

KILL_AT = 15


@pytest.mark.slow
async def test_a_dit_killed_at_step_15_resumes_there_bitwise(start_stack) -> None:
    launcher = start_stack({"dit": 2}, DF_INLINE_MAX_BYTES="0", DF_CHECKPOINT_EVERY="5", DF_CHECKPOINT_MIN_STEPS="0",
                           DF_ACK_WAIT_S="4", DF_HEARTBEAT_S="1", DF_RESTART_DELAY_S="1")
    # 256² makes a step of the tiny model take tens of milliseconds: time to kill mid-run.
    spec = JobSpec(prompt="a lighthouse at dusk", seed=11, steps=20, height=256, width=256)
    twin = spec.model_copy(update={"job_id": "uninterrupted" + spec.job_id[13:]})
    settings = launcher.client_settings()
    async with Client(settings) as client:
        reference = await client.generate(twin, timeout=120)
        assert reference.status == "ok", reference.error
        kv = await bus.checkpoints_bucket(client._js)
        events: list[ProgressEvent] = []
        killed: list[Checkpoint] = []

        def on_event(event: ProgressEvent) -> None:
            events.append(event)
            if event.kind == "step" and event.step == KILL_AT and not killed:
                killed.append(None)  # once; the kill itself needs the bucket, in a task
                asyncio.get_running_loop().create_task(kill_the_runner())

        async def kill_the_runner() -> None:
            # The checkpoint is saved before its step's event: it names the worker to kill.
            record = unpack(Checkpoint, (await kv.get(checkpoint_key(spec.job_id))).value)
            os.kill(int(record.worker.split(":")[1]), signal.SIGKILL)
            killed[0] = record

        started = time.monotonic()
        result = await client.generate(spec, on_event, timeout=120)
        resumed_s = time.monotonic() - started
    assert result.status == "ok", result.error
    [record] = killed
    assert record is not None and record.step == KILL_AT, f"killed at {record}"
    assert [(e.step, e.total) for e in events if e.kind == "resumed"] == [(KILL_AT, spec.steps)]
    assert result.data == reference.data, "the resumed job's image differs from an uninterrupted run's"
    print(f"killed {record.worker} at step {KILL_AT}; resumed and done {resumed_s:.1f} s after submission")

    async with Client(settings) as client:
        kv = await bus.checkpoints_bucket(client._js)
        with pytest.raises(KeyNotFoundError):
            await kv.get(checkpoint_key(spec.job_id))
    transports = Transports(settings.model_copy(update={"shm_dir": launcher._own_shm_dir()}))
    for ref in record.tensors.values():
        with pytest.raises(MissingBlobError):
            transports.get(ref)
