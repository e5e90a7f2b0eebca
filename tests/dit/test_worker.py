"""The DiT worker in-process against a real nats-server, on the tiny PixArt: a draining DiT
checkpoints its running job and hands it back instead of finishing it, and the instance that
takes the job resumes it there, bitwise equal to an uninterrupted run, with a ``resumed`` event;
the checkpoint (record and tensors) is gone once the latents are handed on. The process-kill
case is tests/chaos/test_killed_dit_resumes.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
from nats.js.errors import KeyNotFoundError

from disagfusion import bus
from disagfusion.config import Settings
from disagfusion.models import load_stage_model
from disagfusion.protocol import (
    WORK_STREAM, Checkpoint, JobSpec, MissingBlobError, ProgressEvent, StageTask, checkpoint_key, events_subject, pack,
    unpack, work_subject,
)
from disagfusion.transport import Transports
from services.dit.worker import DitWorker


async def test_a_drained_dit_preempts_and_another_resumes_bitwise(nats_server: str, tiny_models_dir: Path,
                                                                   tmp_path: Path) -> None:
    settings = Settings(nats_url=nats_server, models="tiny", models_dir=tiny_models_dir, shm_dir=tmp_path / "shm",
                        inline_max_bytes=0, checkpoint_every=5, checkpoint_min_steps=0, preempt_min_steps=5)
    encoder = load_stage_model("tiny", "encode", settings)
    denoiser = load_stage_model("tiny", "denoise", settings)
    # 256² makes a step of the tiny model take tens of milliseconds: time to drain mid-run.
    spec = JobSpec(prompt="a lighthouse at dusk", seed=3, steps=20, height=256, width=256)
    [encoded] = encoder.run([spec], [{}])
    [uninterrupted] = denoiser.run([spec], [encoded])

    stack = await bus.connect(settings, "test")
    transports = Transports(settings)
    events: list[ProgressEvent] = []

    async def on_event(msg) -> None:
        events.append(unpack(ProgressEvent, msg.data))

    await stack.nc.subscribe(events_subject(spec.job_id), cb=on_event)
    refs = {name: transports.put(f"{spec.job_id}.encode.{name}", t) for name, t in encoded.items()}
    task = StageTask(job=spec, stage="denoise", tensors=refs)
    await bus.publish(stack.js, work_subject("denoise", "tiny"), pack(task), f"{spec.job_id}:denoise")

    def start(**override) -> tuple[DitWorker, asyncio.Task]:
        worker = DitWorker("denoise", settings.model_copy(update=override), load_model=lambda *_: denoiser)
        return worker, asyncio.create_task(worker.run())

    leaving, running = start()
    deadline = time.monotonic() + 60
    while not any(e.kind == "step" and e.step >= 6 for e in events):  # past the step-5 checkpoint
        assert time.monotonic() < deadline and not running.done(), "the job never got to step 6"
        await asyncio.sleep(0.01)
    leaving.stop()
    await asyncio.wait_for(running, 30)
    kv = await bus.checkpoints_bucket(stack.js)
    record = unpack(Checkpoint, (await kv.get(checkpoint_key(spec.job_id))).value)
    assert 6 <= record.step <= spec.steps - 5, "the drained DiT did not preempt at its next step"
    assert not any(e.kind == "stage_done" for e in events)

    # One delivery allowed: the preemption was a hand-back, not a failed delivery.
    staying, serving = start(max_deliver=1)
    decode = await stack.js.pull_subscribe(work_subject("decode", "tiny"), durable="decode-tiny", stream=WORK_STREAM)
    [msg] = await decode.fetch(1, timeout=60)
    handed_on = unpack(StageTask, msg.data)
    latents = transports.get(handed_on.tensors["latents"])
    assert torch.equal(latents, uninterrupted["latents"]), "the resumed run differs from an uninterrupted one"
    resumed = [e for e in events if e.kind == "resumed"]
    assert [(e.step, e.total) for e in resumed] == [(record.step, spec.steps)]
    steps = [e.step for e in events if e.kind == "step"]
    assert steps[-(spec.steps - record.step):] == list(range(record.step + 1, spec.steps + 1))

    # Cleaned up once handed on: no record, no tensors.
    deadline = time.monotonic() + 10
    while True:
        try:
            await kv.get(checkpoint_key(spec.job_id))
        except KeyNotFoundError:
            break
        assert time.monotonic() < deadline, "the checkpoint record outlived its job"
        await asyncio.sleep(0.1)
    for ref in record.tensors.values():
        with pytest.raises(MissingBlobError):
            transports.get(ref)
    staying.stop()
    await asyncio.wait_for(serving, 30)
    await stack.close()
