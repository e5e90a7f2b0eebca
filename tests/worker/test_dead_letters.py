"""Dead letters: a task given up for a reason other than the user's is kept in DF_DLQ with why,
where and after how many deliveries, and its job's error result says the cause."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from disagfusion import dlq
from disagfusion.client import Client
from disagfusion.config import Settings
from disagfusion.models.base import SpecError
from disagfusion.protocol import StageTask, unpack
from disagfusion.worker.stage_worker import StageWorker
from tests.worker.conftest import Worker
from tests.worker.test_stage_worker import SlowModel, specs, submit_denoise_tasks


class BrokenModel(SlowModel):
    def __init__(self, error: Exception):
        super().__init__(0.0)
        self.error = error

    def run(self, specs, inputs, on_step=None):
        raise self.error


async def test_a_stage_that_raises_dead_letters_the_task_with_the_cause(run_worker: Worker, nats_server: str) -> None:
    [job] = specs(1)
    stack = await submit_denoise_tasks(nats_server, [job])
    await run_worker(BrokenModel(RuntimeError("CUDA error: an illegal memory access")), worker_name="dit-a")
    async with Client(Settings(nats_url=nats_server)) as client:
        result = await client.result(job.job_id, timeout=20)
    assert result.status == "error"
    assert result.error == "stage denoise failed: RuntimeError: CUDA error: an illegal memory access"
    [kept] = [k for k in await dlq.letters(stack.js) if k.letter.job_id == job.job_id]
    letter = kept.letter
    assert (letter.stage, letter.model, letter.deliveries, letter.worker) == ("denoise", "m", 1, "dit-a")
    assert letter.subject == "df.work.denoise.m" and letter.reason == result.error
    assert unpack(StageTask, letter.task).job == job
    await stack.close()


async def test_a_users_error_is_not_dead_lettered(run_worker: Worker, nats_server: str) -> None:
    [job] = specs(1)
    stack = await submit_denoise_tasks(nats_server, [job])
    await run_worker(BrokenModel(SpecError("height", "too tall for this model")))
    async with Client(Settings(nats_url=nats_server)) as client:
        result = await client.result(job.job_id, timeout=20)
    assert (result.status, result.field, result.error) == ("error", "height", "height: too tall for this model")
    assert not [k for k in await dlq.letters(stack.js) if k.letter.job_id == job.job_id]
    await stack.close()


async def test_a_task_out_of_deliveries_names_the_worker_that_never_answered(
    nats_server: str, tmp_path: Path
) -> None:
    """A worker that stalls without heartbeats past AckWait (as one that died would) loses its
    task to another; with no deliveries left, that one answers the job naming the first."""
    [job] = specs(1)
    stack = await submit_denoise_tasks(nats_server, [job])
    base = dict(nats_url=nats_server, models="m", shm_dir=tmp_path / "shm", max_deliver=1, ack_wait_s=1.0)
    stalled = StageWorker("denoise", Settings(**base, heartbeat_s=30, worker_name="dit-stalled"),
                          load_model=lambda name, stage, s: SlowModel(4.0))
    first = asyncio.create_task(stalled.run())
    deadline = time.monotonic() + 20
    while not stalled.held:
        assert time.monotonic() < deadline, "the first worker took no job"
        await asyncio.sleep(0.05)
    second = StageWorker("denoise", Settings(**base, worker_name="dit-second"),
                         load_model=lambda name, stage, s: SlowModel(0.01))
    running = asyncio.create_task(second.run())
    try:
        async with Client(Settings(nats_url=nats_server)) as client:
            result = await client.result(job.job_id, timeout=20)
        assert result.status == "error"
        assert result.error.startswith("stage denoise gave up after 1 delivery attempts; the last: delivery 1 was "
                                       "taken by dit-stalled at ")
        assert "never answered" in result.error
        [kept] = [k for k in await dlq.letters(stack.js) if k.letter.job_id == job.job_id]
        assert (kept.letter.deliveries, kept.letter.worker) == (2, "dit-second")
    finally:
        for worker, task in ((stalled, first), (second, running)):
            worker.stop()
            await asyncio.wait_for(task, 30)
        await stack.close()


class UnluckySender(StageWorker):
    """A worker whose every hand-off fails in a way nothing expects."""

    async def emit(self, job) -> None:
        raise RuntimeError("the output went nowhere")


async def test_an_unexpected_send_failure_is_redelivered_and_its_give_up_names_it(
    nats_server: str, tmp_path: Path
) -> None:
    """After the compute, an unexpected failure is more likely the world's than the task's: the
    task is redelivered (a counted delivery), and once deliveries run out, its error says how
    the last one failed."""
    [job] = specs(1)
    stack = await submit_denoise_tasks(nats_server, [job])
    settings = Settings(nats_url=nats_server, models="m", shm_dir=tmp_path / "shm", max_deliver=1, ack_wait_s=1.0,
                        worker_name="dit-unlucky")
    model = SlowModel(0.01)
    worker = UnluckySender("denoise", settings, load_model=lambda name, stage, s: model)
    running = asyncio.create_task(worker.run())
    try:
        async with Client(Settings(nats_url=nats_server)) as client:
            result = await client.result(job.job_id, timeout=20)
        assert len(model.batches) == 1  # run once, sent never, redelivered once, then given up
        assert result.error.startswith("stage denoise gave up after 1 delivery attempts; the last: delivery 1 was "
                                       "taken by dit-unlucky at ")
        assert result.error.endswith("and failed: stage denoise could not hand on its output: "
                                     "RuntimeError: the output went nowhere")
    finally:
        worker.stop()
        await asyncio.wait_for(running, 30)
        await stack.close()
