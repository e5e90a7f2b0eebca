"""Cancel in a stage worker, in-process against a real nats-server and redis-server: a job
cancelled mid-denoise stops within a step, one cancelled at admission never runs, and a job
sharing a batch with a cancelled one finishes unchanged; each cancelled job has exactly one
result (``cancelled``), and leaves no tensor in Redis and no task held."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis
import torch
from nats.js.errors import NotFoundError

from disagfusion import bus, job_state
from disagfusion.config import Settings
from disagfusion.models.base import StageModel, Tensors
from disagfusion.protocol import (
    RESULTS_STREAM,
    WORK_STREAM,
    JobSpec,
    StageTask,
    consumer_name,
    pack,
    results_subject,
    unpack,
    work_subject,
)
from disagfusion.transport import Transports
from tests.worker.conftest import StartDenoiseWorker

STEP_S = 0.1


class SteppingModel(StageModel):
    """A denoise stage that takes ``STEP_S`` per step and reports each, as a real loop does."""

    stage = "denoise"

    def __init__(self) -> None:
        self.step_started: list[float] = []
        self.runs: list[tuple[list[str], int]] = []
        """(job ids, steps run) of every batch, once it ended."""

    def check(self, spec: JobSpec) -> None:
        pass

    def run(self, specs, inputs, on_step=None) -> list[Tensors]:
        done = 0
        try:
            for step in range(1, specs[0].steps + 1):
                self.step_started.append(time.time())
                time.sleep(STEP_S)
                done = step
                if on_step is not None:
                    on_step(step, specs[0].steps)
        finally:
            self.runs.append(([spec.job_id for spec in specs], done))
        return [{"latents": x["embeds"] * 2} for x in inputs]


def settings(nats_url: str, redis_url: str, model: str, tmp_path: Path, **more) -> Settings:
    """Every tensor through Redis, where a leak shows as a key."""
    return Settings(nats_url=nats_url, redis_url=redis_url, models=model, transport="redis", inline_max_bytes=0,
                    shm_dir=tmp_path / "shm", **more)


Start = Callable[..., Awaitable[SteppingModel]]


@pytest.fixture
def start_worker(start_denoise_worker: StartDenoiseWorker, nats_server: str, redis_server: str, tmp_path: Path) -> Start:
    async def start(model_name: str, **more) -> SteppingModel:
        model = SteppingModel()
        start_denoise_worker(model, settings(nats_server, redis_server, model_name, tmp_path, **more))
        return model

    return start


async def submit(js, nats_url: str, redis_url: str, tmp_path: Path, model: str, jobs: list[JobSpec]) -> None:
    transports = Transports(settings(nats_url, redis_url, model, tmp_path))
    for spec in jobs:
        refs = {"embeds": transports.put(f"{spec.job_id}.encode.embeds", torch.full((4,), float(spec.seed)))}
        task = StageTask(job=spec, stage="denoise", tensors=refs)
        await bus.publish(js, work_subject("denoise", model), pack(task), f"{spec.job_id}:denoise")


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = check()
        if isinstance(done, Awaitable):
            done = await done
        if done:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        await asyncio.sleep(0.05)


async def results_of(js, job_id: str) -> int:
    info = await js.stream_info(RESULTS_STREAM, subjects_filter=results_subject(job_id))
    return sum((info.state.subjects or {}).values())


def blobs_of(redis_url: str, job_id: str) -> list[bytes]:
    return list(redis.Redis.from_url(redis_url).scan_iter(f"df:blob:*{job_id}*"))


async def nothing_held(js, model: str) -> bool:
    try:
        info = await js.consumer_info(WORK_STREAM, consumer_name("denoise", model))
    except NotFoundError:  # the worker has not bound its consumer yet
        return False
    return info.num_pending == 0 and info.num_ack_pending == 0


async def decode_tasks(js, model: str) -> list[StageTask]:
    sub = await js.pull_subscribe(work_subject("decode", model), durable=consumer_name("decode", model),
                                  stream=WORK_STREAM)
    tasks = []
    while True:
        try:
            msgs = await sub.fetch(10, timeout=1.0)
        except TimeoutError:
            return tasks
        for msg in msgs:
            tasks.append(unpack(StageTask, msg.data))
            await msg.ack()


async def test_a_job_cancelled_mid_denoise_stops_within_a_step(
        start_worker: Start, nats_bus: bus.Bus, nats_server: str, redis_server: str, tmp_path: Path) -> None:
    js = nats_bus.js
    spec = JobSpec(prompt="p", model="alone", steps=100)
    await submit(js, nats_server, redis_server, tmp_path, "alone", [spec])
    model = await start_worker("alone")
    await eventually(lambda: len(model.step_started) >= 3, what="three steps")
    result = await job_state.cancel(nats_bus, Settings(nats_url=nats_server), spec.job_id, "test")
    cancelled_at = time.time()
    assert result is not None and result.status == "cancelled", result
    await eventually(lambda: model.runs, what="the loop to stop")
    (job_ids, steps_run), = model.runs
    after = [t for t in model.step_started if t > cancelled_at]
    assert len(after) <= 1, f"{len(after)} steps began after the cancel (ran {steps_run} of 100)"
    assert steps_run < 100
    await eventually(lambda: nothing_held(js, "alone"), what="the task to be terminated")
    assert await results_of(js, spec.job_id) == 1
    await eventually(lambda: not blobs_of(redis_server, spec.job_id), what="its input to be deleted")
    assert await decode_tasks(js, "alone") == []
    kv = await bus.jobs_bucket(js, Settings(nats_url=nats_server))

    async def stopped_state() -> bool:
        state = await job_state.read_state(kv, spec.job_id)
        return state is not None and state.state == "cancelled" and state.stage == "denoise" and state.step == steps_run

    await eventually(stopped_state, what="the state to say where it stopped")


async def test_a_job_cancelled_while_queued_is_dropped_at_admission(
        start_worker: Start, nats_bus: bus.Bus, nats_server: str, redis_server: str, tmp_path: Path) -> None:
    js = nats_bus.js
    spec = JobSpec(prompt="p", model="queued", steps=5)
    await submit(js, nats_server, redis_server, tmp_path, "queued", [spec])
    # Published straight to NATS, it has no state: the canceller vouches for it. No stage runs
    # to answer the cancel, so the worker that takes the job answers it, at admission.
    with pytest.raises(job_state.CancelPending, match="no stage is running"):
        await job_state.cancel(nats_bus, Settings(nats_url=nats_server), spec.job_id, "test", known=True)
    model = await start_worker("queued")
    await eventually(lambda: results_of(js, spec.job_id), what="its cancelled result")
    assert (await job_state.find_result(js, spec.job_id)).model_dump(include={"status", "stage"}) \
        == {"status": "cancelled", "stage": "denoise"}
    await eventually(lambda: nothing_held(js, "queued"), what="the task to be dropped")
    await eventually(lambda: not blobs_of(redis_server, spec.job_id), what="its input to be deleted")
    assert model.runs == [] and model.step_started == []
    assert await results_of(js, spec.job_id) == 1
    assert await decode_tasks(js, "queued") == []


async def test_a_job_sharing_a_batch_with_a_cancelled_one_finishes_unchanged(
        start_worker: Start, nats_bus: bus.Bus, nats_server: str, redis_server: str, tmp_path: Path) -> None:
    """The batch runs on for the job left (its pixels must not depend on a neighbour's cancel);
    the cancelled job's output is dropped, and its result was given at once by the cancel."""
    js = nats_bus.js
    # A worker's first pull takes one job, to learn its size; the two behind it come in one pull.
    first = JobSpec(prompt="p", model="shared", steps=1)
    cancelled, neighbour = (JobSpec(prompt="p", model="shared", steps=10, seed=seed) for seed in (3, 4))
    await submit(js, nats_server, redis_server, tmp_path, "shared", [first, cancelled, neighbour])
    model = await start_worker("shared", max_batch=2, max_batch_wait_ms=500)
    await eventually(lambda: len(model.step_started) >= 3, what="two steps of the batch")
    result = await job_state.cancel(nats_bus, Settings(nats_url=nats_server), cancelled.job_id, "test")
    assert result is not None and result.status == "cancelled"
    await eventually(lambda: len(model.runs) == 2, what="the batch to end")
    assert model.runs[1] == ([cancelled.job_id, neighbour.job_id], 10), "the batch did not run on for its other job"
    handed_on = {task.job.job_id: task for task in await decode_tasks(js, "shared")}
    assert set(handed_on) == {first.job_id, neighbour.job_id}
    transports = Transports(settings(nats_server, redis_server, "shared", tmp_path))
    latents = transports.get(handed_on[neighbour.job_id].tensors["latents"])
    assert torch.equal(latents, torch.full((4,), 2.0 * neighbour.seed))  # what it makes alone
    for task in handed_on.values():
        transports.delete(task.tensors["latents"])
    await eventually(lambda: nothing_held(js, "shared"), what="both tasks to end")
    assert await results_of(js, cancelled.job_id) == 1 and await results_of(js, neighbour.job_id) == 0
    for spec in (cancelled, neighbour):
        await eventually(lambda: not blobs_of(redis_server, spec.job_id), what=f"the tensors of {spec.job_id} to go")
