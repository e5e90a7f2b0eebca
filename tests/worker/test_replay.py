"""A job whose input vanished is sent back to its first stage (``disagfusion.worker.replay``):
with a replay-aware message id, a ``replayed`` event and no result; past ``max_input_replays``
it gets an error result saying that its input kept vanishing."""

from __future__ import annotations

import asyncio

import torch

from disagfusion import bus
from disagfusion.client import Client
from disagfusion.config import Settings
from disagfusion.protocol import (
    WORK_STREAM, ProgressEvent, StageTask, events_subject, pack, task_msg_id, unpack, work_subject,
)
from disagfusion.transport import Transports
from disagfusion.worker.replay import first_stage_task, result_run
from tests.worker.conftest import Worker
from tests.worker.test_stage_worker import SlowModel, specs


def vanished_task(settings: Settings, spec, input_replays: int = 0) -> StageTask:
    """A denoise task whose input was stored and then removed, as a Redis restart leaves it."""
    transports = Transports(settings)
    ref = transports.put(f"{spec.job_id}.encode.embeds", torch.full((4,), float(spec.seed)))
    transports.delete(ref)
    transports.close()
    return StageTask(job=spec, stage="denoise", tensors={"embeds": ref}, replay=input_replays,
                     input_replays=input_replays)


def test_the_first_stage_task_counts_the_replay_and_keeps_the_submission_time() -> None:
    [spec] = specs(1)
    task = StageTask(job=spec, stage="decode", submitted_at=12.5, replay=2, input_replays=1)
    again = first_stage_task(task)
    assert (again.stage, again.tensors, again.submitted_at, again.replay, again.input_replays) == \
        ("encode", {}, 12.5, 3, 2)
    assert first_stage_task(again).handed_on({}, 0.1, 1).input_replays == 3
    # Input replays share the result's message id: one result per job, whichever run ends.
    assert result_run(task) == result_run(again) == 1


async def test_a_task_whose_input_vanished_is_replayed_from_the_first_stage(
    run_worker: Worker, nats_server: str, tmp_path
) -> None:
    [job] = specs(1)
    settings = Settings(nats_url=nats_server, shm_dir=tmp_path / "shm", inline_max_bytes=0)
    stack = await bus.connect(Settings(nats_url=nats_server), "test")
    events: list[ProgressEvent] = []

    async def on_event(msg) -> None:
        events.append(unpack(ProgressEvent, msg.data))

    sub = await stack.nc.subscribe(events_subject(job.job_id), cb=on_event)
    encode = await stack.js.pull_subscribe(work_subject("encode", "m"), durable="encode-m", stream=WORK_STREAM)
    await bus.publish(stack.js, work_subject("denoise", "m"), pack(vanished_task(settings, job)),
                      task_msg_id(job.job_id, "denoise"))
    model = await run_worker(SlowModel(0.01), inline_max_bytes=0)
    [msg] = await encode.fetch(1, timeout=20)
    again = unpack(StageTask, msg.data)
    assert (again.job, again.stage, again.replay, again.input_replays) == (job, "encode", 1, 1)
    assert msg.header["Nats-Msg-Id"] == task_msg_id(job.job_id, "encode", 1)
    await msg.ack()
    await asyncio.sleep(0.5)
    assert [e.kind for e in events if e.kind in ("replayed", "error")] == ["replayed"]
    assert model.batches == []
    # The vanished task is terminated, not redelivered.
    info = await stack.js.consumer_info(WORK_STREAM, "denoise-m")
    assert info.num_pending == 0 and info.num_ack_pending == 0
    await sub.unsubscribe()
    await stack.close()


async def test_a_job_whose_input_keeps_vanishing_gets_an_error_result(run_worker: Worker, nats_server: str, tmp_path) -> None:
    [job] = specs(1)
    settings = Settings(nats_url=nats_server, shm_dir=tmp_path / "shm", inline_max_bytes=0)
    stack = await bus.connect(Settings(nats_url=nats_server), "test")
    task = vanished_task(settings, job, input_replays=2)
    await bus.publish(stack.js, work_subject("denoise", "m"), pack(task), task_msg_id(job.job_id, "denoise", 2))
    await run_worker(SlowModel(0.01), max_input_replays=2)
    async with Client(Settings(nats_url=nats_server)) as client:
        result = await client.result(job.job_id, timeout=20)
    await stack.close()
    assert (result.status, result.stage) == ("error", "denoise")
    assert "kept vanishing: the job was replayed 2 time(s)" in result.error
