"""The stage worker in-process against a real nats-server: overlap, batching, drain, and how it
answers every failure (a lying task, Redis down, a loop that dies, a pull that stalls)."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from pathlib import Path

import pytest
import redis
import torch

from disagfusion import bus, health
from disagfusion.config import Settings
from disagfusion.client import Client, JobTimeout
from disagfusion.health import health_age
from disagfusion.models.base import SpecError, StageModel, Tensors
from disagfusion.protocol import WORK_STREAM, JobSpec, StageTask, TensorRef, pack, unpack, work_subject
from disagfusion.worker.stage_worker import StageWorker, WorkerCrashed
from disagfusion.transport import Transports
from tests.worker.conftest import Worker


class SlowModel(StageModel):
    """A denoise stage that holds the "accelerator" for a fixed time per batch."""

    stage = "denoise"

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.batches: list[list[tuple]] = []
        """The shape key of every job, per batch run."""
        self.job_ids: list[list[str]] = []

    def check(self, spec: JobSpec) -> None:
        pass

    def run(self, specs, inputs, on_step=None) -> list[Tensors]:
        time.sleep(self.seconds)
        self.batches.append([spec.shape_key for spec in specs])
        self.job_ids.append([spec.job_id for spec in specs])
        return [{"latents": x["embeds"] * 2} for x in inputs]




async def submit_denoise_tasks(nats_url: str, specs: list[JobSpec]) -> bus.Bus:
    stack = await bus.connect(Settings(nats_url=nats_url), "test")
    transports = Transports(Settings(nats_url=nats_url))
    for spec in specs:
        refs = {"embeds": transports.put(f"{spec.job_id}.encode.embeds", torch.full((4,), float(spec.seed)))}
        task = StageTask(job=spec, stage="denoise", tensors=refs)
        await bus.publish(stack.js, work_subject("denoise", "m"), pack(task), f"{spec.job_id}:denoise")
    return stack


async def collect_outputs(stack: bus.Bus, count: int, timeout: float = 60.0) -> list[tuple[float, StageTask]]:
    """Take ``count`` tasks from the decode queue (what the worker under test produced), each
    with the time it was taken."""
    sub = await stack.js.pull_subscribe(work_subject("decode", "m"), durable="decode-m", stream=WORK_STREAM)
    outputs: list[tuple[float, StageTask]] = []
    deadline = time.monotonic() + timeout
    while len(outputs) < count and time.monotonic() < deadline:
        try:
            [msg] = await sub.fetch(1, timeout=1.0)
        except TimeoutError:
            continue
        outputs.append((time.monotonic(), unpack(StageTask, msg.data)))
        await msg.ack()
    return outputs


def specs(n: int, **fields) -> list[JobSpec]:
    return [JobSpec(prompt="p", model="m", seed=i, **fields) for i in range(n)]


@pytest.mark.parametrize("pipeline", ["async", "sync"])
async def test_prefetch_hides_handoff_behind_compute(run_worker: Worker, nats_server: str, pipeline: str) -> None:
    """Handoff 150 ms, compute 150 ms: in steady state async emits a job every max(·) = 150 ms,
    sync every sum = 300 ms. Measured from the first output to the last, so the worker's
    start-up does not count."""
    n, compute_s, handoff_ms = 10, 0.15, 150.0
    jobs = specs(n)
    stack = await submit_denoise_tasks(nats_server, jobs)
    await run_worker(SlowModel(compute_s), pipeline=pipeline, handoff_delay_ms=handoff_ms)
    outputs = await collect_outputs(stack, n)
    await stack.close()
    assert sorted(o.job.job_id for _, o in outputs) == sorted(j.job_id for j in jobs)
    elapsed = outputs[-1][0] - outputs[0][0]
    serial = (n - 1) * (compute_s + handoff_ms / 1000)
    if pipeline == "async":
        assert elapsed < 0.75 * serial, f"async took {elapsed:.2f} s for {n - 1} jobs, the serial sum is {serial:.2f} s"
    else:
        assert elapsed > 0.9 * serial, f"sync took {elapsed:.2f} s for {n - 1} jobs, less than the serial sum {serial:.2f} s"


async def test_batches_group_jobs_of_one_shape_and_keep_every_job(run_worker: Worker, nats_server: str) -> None:
    small, large = specs(6, width=64, height=64), specs(6, width=128, height=128)
    jobs = [job for pair in zip(small, large) for job in pair]  # interleaved shapes
    stack = await submit_denoise_tasks(nats_server, jobs)
    model = await run_worker(SlowModel(0.05), max_batch=4, max_batch_wait_ms=300)
    outputs = await collect_outputs(stack, len(jobs))
    await stack.close()
    assert sorted(o.job.job_id for _, o in outputs) == sorted(j.job_id for j in jobs)
    sizes = [len(batch) for batch in model.batches]
    assert max(sizes) > 1, f"no batching happened: {sizes}"
    assert sum(sizes) == len(jobs)
    assert all(len(set(batch)) == 1 for batch in model.batches), "a batch mixed job shapes"
    transports = Transports(Settings())
    for _, output in outputs:  # each job got its own output, not a neighbour's
        latents = transports.get(output.tensors["latents"])
        assert torch.equal(latents, torch.full((4,), 2.0 * output.job.seed))


async def test_a_batched_job_reports_its_share_of_the_batch_and_the_batch_size(run_worker: Worker, nats_server: str) -> None:
    """Timings are seconds per job: a batch of n that held the device for s seconds gives each
    of its jobs s/n, and says n."""
    jobs = specs(4)
    stack = await submit_denoise_tasks(nats_server, jobs)
    model = await run_worker(SlowModel(0.4), max_batch=4, max_batch_wait_ms=300)
    outputs = await collect_outputs(stack, len(jobs))
    await stack.close()
    size_of = {job_id: len(batch) for batch in model.job_ids for job_id in batch}
    for _, output in outputs:
        n = output.batch_sizes["denoise"]
        assert n == size_of[output.job.job_id]
        assert 0.4 / n <= output.timings["denoise"] < 0.4 * 2 / n  # its share, not the whole batch's 0.4 s
    assert max(size_of.values()) > 1, f"no batching happened: {model.job_ids}"


async def test_a_busy_worker_leaves_jobs_it_cannot_start_soon_to_an_idle_one(run_worker: Worker, nats_server: str) -> None:
    """Once a worker has timed a shape at 1.5 s, it fetches the next job of that shape only in
    the last DF_FETCH_AHEAD_S of the running one (before it has timed it, not at all): the jobs
    queued meanwhile stay in the queue for an instance that idles, instead of waiting behind
    the busy one. Fetching all it may hold (the old behaviour) left the second instance nothing."""
    stack = await submit_denoise_tasks(nats_server, specs(1))
    busy = await run_worker(SlowModel(1.5), fetch_ahead_s=0.3, max_in_flight=4)
    await collect_outputs(stack, 1)  # the busy worker has timed the shape
    jobs = specs(4)
    await (await submit_denoise_tasks(nats_server, jobs)).close()
    await asyncio.sleep(0.5)  # the busy worker is inside its first job
    idle = await run_worker(SlowModel(1.5), fetch_ahead_s=0.3, max_in_flight=4)
    outputs = await collect_outputs(stack, len(jobs))
    await stack.close()
    assert sorted(o.job.job_id for _, o in outputs) == sorted(j.job_id for j in jobs)
    ran_busy, ran_idle = len(busy.batches) - 1, len(idle.batches)
    assert ran_busy + ran_idle == len(jobs)
    assert ran_idle >= 2, f"the idle worker ran {ran_idle} of {len(jobs)} jobs; the busy one held the rest"


async def test_a_worker_takes_no_job_ahead_of_a_shape_it_has_not_timed(nats_server: str, tmp_path: Path) -> None:
    """The first job of a shape might take 14 s: until it is done the worker fetches nothing
    more, so the other queued jobs stay free for other instances."""
    jobs = specs(3)
    stack = await submit_denoise_tasks(nats_server, jobs)
    model = SlowModel(1.5)
    settings = Settings(nats_url=nats_server, models="m", shm_dir=tmp_path / "shm", max_in_flight=4)
    worker = StageWorker("denoise", settings, load_model=lambda name, stage, s: model)
    running = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 30
    while not worker.held:
        assert time.monotonic() < deadline, "the worker took no job"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert worker.held == 1, f"the worker took {worker.held} jobs before it had timed one"
    outputs = await collect_outputs(stack, len(jobs))
    worker.stop()
    await asyncio.wait_for(running, 30)
    await stack.close()
    assert sorted(o.job.job_id for _, o in outputs) == sorted(j.job_id for j in jobs)


async def test_drain_runs_the_started_job_and_hands_back_the_rest(run_worker: Worker, nats_server: str, tmp_path: Path) -> None:
    """A stopped worker finishes the job it is running and at once hands the ones it fetched
    ahead back, for the instance that stays: those are done before the running one. Every job
    is run exactly once. A hand-back is not a failed delivery: the staying worker allows one
    delivery and still runs them."""
    jobs = specs(4)
    stack = await submit_denoise_tasks(nats_server, jobs)
    leaving = SlowModel(3.0)
    # Told to fetch ahead without limit, it takes all four at once.
    settings = Settings(nats_url=nats_server, models="m", shm_dir=tmp_path / "shm", max_in_flight=4, fetch_ahead_s=math.inf)
    worker = StageWorker("denoise", settings, load_model=lambda name, stage, s: leaving)
    running = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 30
    while worker.held < len(jobs):  # one computing, three fetched ahead
        assert time.monotonic() < deadline, f"the worker took only {worker.held} of {len(jobs)} jobs"
        await asyncio.sleep(0.05)
    staying = await run_worker(SlowModel(0.05), max_deliver=1)
    worker.stop()
    await asyncio.wait_for(running, 30)
    assert sum(len(batch) for batch in leaving.batches) == 1, f"the stopped worker ran {leaving.batches}"
    assert sum(len(batch) for batch in staying.batches) == len(jobs) - 1, "the handed-back jobs waited for the running one"
    outputs = await collect_outputs(stack, len(jobs))
    await stack.close()
    assert sorted(o.job.job_id for _, o in outputs) == sorted(j.job_id for j in jobs)


async def test_a_model_that_cannot_load_answers_its_jobs_with_the_reason(nats_server: str, tmp_path: Path) -> None:
    """A worker whose model fails to load (a missing component) keeps serving: its jobs end at
    once in an error result naming what is missing, instead of waiting for a model never loaded."""
    reason = SpecError("model", "sd3 model at /models/m lacks vae/ (loaded by decode)")

    def load_model(name: str, stage: str, settings: Settings) -> StageModel:
        raise reason

    settings = Settings(nats_url=nats_server, models="m", shm_dir=tmp_path / "shm")
    worker = StageWorker("denoise", settings, load_model=load_model)
    running = asyncio.create_task(worker.run())
    [job] = specs(1)
    stack = await submit_denoise_tasks(nats_server, [job])
    try:
        async with Client(Settings(nats_url=nats_server)) as client:
            result = await client.result(job.job_id, timeout=20)
        assert (result.status, result.field, result.stage) == ("error", "model", "denoise")
        assert "lacks vae/" in result.error
    finally:
        await stack.close()
        worker.stop()
        await asyncio.wait_for(running, 30)


# ----------------------------------------------------------------- a worker never dies quietly


async def publish_task(stack: bus.Bus, spec: JobSpec, refs: dict[str, TensorRef]) -> None:
    # model_construct: a lying ref must reach the worker, as it would from a broken producer.
    task = StageTask.model_construct(job=spec, stage="denoise", tensors=refs)
    await bus.publish(stack.js, work_subject("denoise", "m"), pack(task), f"{spec.job_id}:denoise")


def inline_ref(spec: JobSpec) -> TensorRef:
    return Transports(Settings()).inline.put(f"{spec.job_id}.encode.embeds", torch.full((4,), float(spec.seed)))


@pytest.mark.parametrize(
    ("lie", "words"),
    [({"shape": [64, 64]}, "shape [64, 64] of float32 is 16384 bytes, not nbytes=16"),
     ({"dtype": "complex64"}, "unknown dtype 'complex64'")],
    ids=["lying shape", "unknown dtype"],
)
async def test_a_task_whose_tensor_ref_lies_gets_an_error_result_and_the_worker_serves_on(
    run_worker: Worker, nats_server: str, lie: dict, words: str
) -> None:
    """An inline tensor whose shape does not hold its bytes, or whose dtype nobody knows, used
    to end the fetch loop silently; it is answered, and the worker takes the next job."""
    bad, good = specs(2)
    stack = await bus.connect(Settings(nats_url=nats_server), "test")
    lying = TensorRef.model_construct(**{**inline_ref(bad).model_dump(), **lie})
    await publish_task(stack, bad, {"embeds": lying})
    await run_worker(SlowModel(0.01))
    async with Client(Settings(nats_url=nats_server)) as client:
        result = await client.result(bad.job_id, timeout=20)
    assert (result.status, result.stage) == ("error", "denoise")
    assert words in result.error
    await publish_task(stack, good, {"embeds": inline_ref(good)})
    [(_, output)] = await collect_outputs(stack, 1, timeout=20)
    await stack.close()
    assert output.job.job_id == good.job_id


async def test_a_task_met_while_redis_is_down_is_retried_not_failed(
    run_worker: Worker, nats_server: str, restartable_redis, role_url
) -> None:
    """Redis unreachable while a task's inputs load: the task goes back with a delay (no error
    result), and once Redis is back (empty, as after a restart without persistence, so the
    producer's blob is written again) the job is served, and so is the next one."""
    job, after = specs(2)
    redis_settings = Settings(nats_url=nats_server, redis_url=restartable_redis.url, transport="redis",
                              inline_max_bytes=0)
    producer = Transports(redis_settings)
    embeds = torch.full((4,), float(job.seed))
    ref = producer.put(f"{job.job_id}.encode.embeds", embeds)
    restartable_redis.stop()
    stack = await bus.connect(Settings(nats_url=nats_server), "test")
    await publish_task(stack, job, {"embeds": ref})
    model = await run_worker(SlowModel(0.01), redis_url=restartable_redis.url, retry_delay_s=0.2,
                             retry_max_delay_s=1.0, max_deliver=1)
    async with Client(Settings(nats_url=nats_server)) as client:
        with pytest.raises(JobTimeout):  # retried all along, never failed
            await client.result(job.job_id, timeout=4)
    assert model.batches == []
    restartable_redis.start()
    assert producer.put(f"{job.job_id}.encode.embeds", embeds) == ref
    [(_, output)] = await collect_outputs(stack, 1, timeout=20)
    assert output.job.job_id == job.job_id
    await publish_task(stack, after, {"embeds": producer.put(f"{after.job_id}.encode.embeds", embeds)})
    [(_, output)] = await collect_outputs(stack, 1, timeout=20)
    await stack.close()
    producer.close()
    assert output.job.job_id == after.job_id


async def test_a_worker_whose_loop_dies_turns_unhealthy_and_exits(
    nats_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop ending while the worker serves is a bug: the health check fails at once and the
    worker exits with the reason, for its supervisor to restart it, instead of holding tasks
    while looking alive."""
    health_file = tmp_path / "health"
    monkeypatch.setenv("DF_HEALTH_FILE", str(health_file))
    settings = Settings(nats_url=nats_server, models="m", shm_dir=tmp_path / "shm", heartbeat_s=0.2)
    worker = StageWorker("denoise", settings, load_model=lambda name, stage, s: SlowModel(0.01))

    async def broken() -> list:
        await asyncio.sleep(1.0)  # long enough to have been healthy first
        raise RuntimeError("injected bug")

    worker._next_batch = broken
    running = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 20
    while health_age(health_file) is None:
        assert time.monotonic() < deadline, "the worker never reported healthy"
        await asyncio.sleep(0.05)
    with pytest.raises(WorkerCrashed, match="compute loop .* ended: RuntimeError: injected bug"):
        await asyncio.wait_for(running, 20)
    assert health_age(health_file) is None
    assert health.main() == 1
    assert health_file.read_text().startswith("unhealthy: compute loop")


async def test_a_worker_whose_pull_stalls_while_work_waits_turns_unhealthy(
    nats_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    health_file = tmp_path / "health"
    monkeypatch.setenv("DF_HEALTH_FILE", str(health_file))
    settings = Settings(nats_url=nats_server, models="m", shm_dir=tmp_path / "shm", heartbeat_s=0.2,
                        fetch_stall_s=1.0)
    worker = StageWorker("denoise", settings, load_model=lambda name, stage, s: SlowModel(0.01))
    release = threading.Event()
    get_all = worker.transports.get_all

    def hanging_get_all(refs):  # a handoff that never returns
        release.wait(30)
        return get_all(refs)

    worker.transports.get_all = hanging_get_all
    jobs = specs(2)
    stack = await submit_denoise_tasks(nats_server, jobs)
    running = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + 20
        while not (health_file.exists() and health_file.read_text().startswith("unhealthy")):
            assert time.monotonic() < deadline, "the stalled worker stayed healthy"
            await asyncio.sleep(0.1)
        assert "has not fetched from denoise-m" in health_file.read_text()
        assert health.main() == 1
    finally:
        release.set()
    outputs = await collect_outputs(stack, len(jobs), timeout=30)
    assert sorted(o.job.job_id for _, o in outputs) == sorted(j.job_id for j in jobs)
    deadline = time.monotonic() + 10
    while health_age(health_file) is None:  # serving again
        assert time.monotonic() < deadline, "the worker stayed unhealthy after the pull came back"
        await asyncio.sleep(0.1)
    worker.stop()
    await asyncio.wait_for(running, 30)
    await stack.close()


async def test_a_deleted_consumer_is_recreated_and_the_stage_serves_on(run_worker: Worker, nats_server: str) -> None:
    """Deleting a stage's durable consumer (by hand, or a JetStream that lost its state) used to
    stop that stage for good; the worker recreates it at its next pull."""
    first, second = specs(2)
    stack = await submit_denoise_tasks(nats_server, [first])
    await run_worker(SlowModel(0.01))
    [(_, output)] = await collect_outputs(stack, 1, timeout=20)
    assert output.job.job_id == first.job_id
    await stack.js.delete_consumer(WORK_STREAM, "denoise-m")
    await (await submit_denoise_tasks(nats_server, [second])).close()
    [(_, output)] = await collect_outputs(stack, 1, timeout=20)
    await stack.close()
    assert output.job.job_id == second.job_id


async def test_redis_out_of_memory_while_storing_an_output_is_retried_later_then_served(
    run_worker: Worker, nats_server: str, restartable_redis, role_url
) -> None:
    """A real redis-server at its ``maxmemory`` refuses the output's write: the task goes back
    with a delay (not a crash, not an error result, not a failed delivery: max_deliver is 1),
    and once Redis has room the job is served."""
    [job] = specs(1)
    store = redis.Redis.from_url(role_url(restartable_redis.url, "admin"))  # CONFIG is the admin's
    store.config_set("maxmemory-policy", "noeviction")
    store.config_set("maxmemory", 1)  # below what an empty server uses: every write is refused
    stack = await bus.connect(Settings(nats_url=nats_server), "test")
    await publish_task(stack, job, {"embeds": inline_ref(job)})
    model = await run_worker(SlowModel(0.01), redis_url=restartable_redis.url, transport="redis", inline_max_bytes=0,
                             ack_wait_s=1.0, heartbeat_s=0.2, retry_delay_s=0.2, retry_max_delay_s=0.5, max_deliver=1)
    async with Client(Settings(nats_url=nats_server)) as client:
        with pytest.raises(JobTimeout):  # retried all along, never failed
            await client.result(job.job_id, timeout=3)
    assert len(model.batches) >= 2, "the task was not handed back and taken again"
    store.config_set("maxmemory", 0)
    [(_, output)] = await collect_outputs(stack, 1, timeout=20)
    await stack.close()
    store.close()
    assert output.job.job_id == job.job_id
    assert output.tensors["latents"].transport == "redis"


class SteppingModel(SlowModel):
    """A denoise stage of ``steps`` steps of ``seconds`` each, reporting every step."""

    def __init__(self, seconds: float, steps: int):
        super().__init__(seconds)
        self.steps = steps

    def run(self, specs, inputs, on_step=None) -> list[Tensors]:
        for step in range(1, self.steps + 1):
            time.sleep(self.seconds)
            on_step(step, self.steps)
        self.job_ids.append([spec.job_id for spec in specs])
        return [{"latents": x["embeds"] * 2} for x in inputs]


async def test_a_late_job_in_a_batch_with_time_left_is_answered_and_the_other_served(
    run_worker: Worker, nats_server: str
) -> None:
    """The loop runs on for the job that has time; the late one gets its error result when the
    batch ends, the other its output. Alone, a late job stops the loop between steps."""
    model = await run_worker(SteppingModel(0.2, 15), max_batch=2, max_batch_wait_ms=500, fetch_ahead_s=math.inf)
    await asyncio.sleep(0.5)  # connected and pulling: the deadlines are about the compute
    late, timely = (JobSpec(prompt="p", model="m", seed=i, deadline_s=d) for i, d in enumerate((2.0, 60.0)))
    stack = await submit_denoise_tasks(nats_server, [late, timely])
    async with Client(Settings(nats_url=nats_server)) as client:
        result = await client.result(late.job_id, timeout=20)
        [(_, output)] = await collect_outputs(stack, 1, timeout=20)
        assert model.job_ids == [[late.job_id, timely.job_id]]
        assert output.job.job_id == timely.job_id
        assert (result.status, result.field) == ("error", "deadline_s")
        assert "passed its deadline of 2 s" in result.error and "when stage denoise finished it" in result.error
        await stack.close()

        alone = JobSpec(prompt="p", model="m", seed=2, deadline_s=1.0)
        submitted = time.time()
        stack = await submit_denoise_tasks(nats_server, [alone])
        result = await client.result(alone.job_id, timeout=20)
        assert "stopped at step" in result.error, result.error
        assert result.finished_at - submitted < 1.0 + 0.5
    await stack.close()


async def test_a_job_late_before_its_batch_starts_is_answered_and_the_worker_serves_on(
    run_worker: Worker, nats_server: str
) -> None:
    """Admitted in time, late once its batch stops waiting for more jobs: answered without
    running, and the worker (which waited for it to be timed before fetching more) fetches on."""
    model = await run_worker(SlowModel(0.01), max_batch=2, max_batch_wait_ms=1000)
    await asyncio.sleep(0.5)
    late, after = JobSpec(prompt="p", model="m", seed=0, deadline_s=0.5), JobSpec(prompt="p", model="m", seed=1)
    stack = await submit_denoise_tasks(nats_server, [late])
    async with Client(Settings(nats_url=nats_server)) as client:
        result = await client.result(late.job_id, timeout=20)
    assert "before stage denoise started it" in result.error, result.error
    await stack.close()
    stack = await submit_denoise_tasks(nats_server, [after])
    [(_, output)] = await collect_outputs(stack, 1, timeout=20)
    await stack.close()
    assert output.job.job_id == after.job_id and model.job_ids == [[after.job_id]]


class BigOutputModel(SlowModel):
    """A denoise stage whose output is larger than NATS's 1 MiB max payload."""

    def run(self, specs, inputs, on_step=None) -> list[Tensors]:
        self.job_ids.append([spec.job_id for spec in specs])
        return [{"latents": torch.zeros(300_000)} for _ in inputs]


async def test_an_output_over_the_max_payload_is_an_error_result_not_a_retry_loop(
    run_worker: Worker, nats_server: str
) -> None:
    """Its next task cannot be published as it is, now or later: one run, then an error result."""
    [job] = specs(1)
    stack = await submit_denoise_tasks(nats_server, [job])
    model = await run_worker(BigOutputModel(0), inline_max_bytes=10 * 2**20)  # the 1.2 MB tensor travels inline
    async with Client(Settings(nats_url=nats_server)) as client:
        started = time.monotonic()
        result = await client.result(job.job_id, timeout=20)
    await stack.close()
    assert time.monotonic() - started < 5
    assert (result.status, result.stage) == ("error", "denoise")
    assert "could not hand on its output: MaxPayloadError: nats: maximum payload exceeded" in result.error
    assert model.job_ids == [[job.job_id]]


async def test_a_stage_handing_on_into_a_full_work_stream_retries_until_there_is_room(
    run_worker: Worker, nats_server: str
) -> None:
    """DF_WORK at its DF_WORK_MAX_MSGS refuses the next stage's task: the job is retried later,
    neither failed nor dropped, and served once the stream has room."""
    jobs = specs(2)
    stack = await submit_denoise_tasks(nats_server, jobs)
    limited = await bus.connect(Settings(nats_url=nats_server, work_max_msgs=2), "test")  # full now
    try:
        model = await run_worker(SlowModel(0.01), ack_wait_s=1.0, heartbeat_s=0.2, retry_delay_s=0.2,
                                 retry_max_delay_s=0.5, max_deliver=1)
        async with Client(Settings(nats_url=nats_server)) as client:
            with pytest.raises(JobTimeout):  # retried all along, never failed
                await client.result(jobs[0].job_id, timeout=3)
        assert model.job_ids, "the worker never ran the job it could not hand on"
    finally:
        await limited.close()
        defaults = await bus.connect(Settings(nats_url=nats_server, work_max_msgs=Settings().work_max_msgs), "test")
        await defaults.close()
    outputs = await collect_outputs(stack, 2, timeout=20)
    await stack.close()
    assert sorted(task.job.job_id for _, task in outputs) == sorted(job.job_id for job in jobs)
