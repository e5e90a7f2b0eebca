"""The limits on one job and on the queue (``disagfusion.limits``, ``disagfusion.stream_limits``):
the checks themselves, and the client and the streams against a real nats-server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from disagfusion import bus
from disagfusion.client import Client
from disagfusion.config import LimitSettings, Settings
from disagfusion.cost import CostProfile, StageCost
from disagfusion.limits import (
    LimitError,
    QueueFull,
    check_deadline,
    check_job,
    deadline_s,
    entry_backlog,
    profile_predictor,
    stop_when_late,
)
from disagfusion.protocol import WORK_STREAM, JobSpec, StageTask, unpack, work_subject

LIMITS = LimitSettings(max_prompt_bytes=1000, max_job_mpx_steps=100.0)


def test_a_prompt_over_the_byte_limit_names_the_field_the_limit_and_its_size() -> None:
    check_job(JobSpec(prompt="é" * 500), LIMITS)  # 1000 bytes: at the limit
    with pytest.raises(LimitError, match=r"prompt: 1002 bytes .* limit of 1000 bytes \(DF_MAX_PROMPT_BYTES\)") as caught:
        check_job(JobSpec(prompt="é" * 501), LIMITS)
    assert caught.value.field == "prompt"
    with pytest.raises(LimitError) as caught:
        check_job(JobSpec(prompt="x", negative_prompt="n" * 1001), LIMITS)
    assert caught.value.field == "negative_prompt"


def test_a_job_over_the_work_limit_names_its_size_and_the_limit() -> None:
    check_job(JobSpec(prompt="x", width=1000, height=1000, steps=100), LIMITS)  # 100 mpx-steps: at the limit
    with pytest.raises(LimitError, match=r"8192x8192 x 1 frame\(s\) x 1000 steps = 67108.9 .* limit of 100 "
                                         r"\(DF_MAX_JOB_MPX_STEPS\)"):
        check_job(JobSpec(prompt="x", width=8192, height=8192, steps=1000), LIMITS)


def test_a_job_predicted_over_the_seconds_limit_by_its_profile_is_refused(tmp_path: Path) -> None:
    CostProfile(model="m", hardware="h", source="test", kind="synthetic",
                stages={"denoise": StageCost(per_mpixel_s=1.0, per_step=True)}).save(tmp_path / "m.yaml")
    predict = profile_predictor(tmp_path)
    limits = LimitSettings(max_job_seconds=10.0)
    check_job(JobSpec(prompt="x", model="m", width=1000, height=1000, steps=10), limits, predict)  # 10 s
    with pytest.raises(LimitError, match=r"predicted to take 11.0 s .* limit of 10 s \(DF_MAX_JOB_SECONDS\)"):
        check_job(JobSpec(prompt="x", model="m", width=1000, height=1000, steps=11), limits, predict)
    check_job(JobSpec(prompt="x", model="other", steps=1000), limits, predict)  # no profile: not predicted


def test_a_deadline_is_the_jobs_own_at_most_the_deployments() -> None:
    assert deadline_s(JobSpec(prompt="x"), LimitSettings()) is None
    assert deadline_s(JobSpec(prompt="x"), LimitSettings(job_deadline_s=30)) == 30
    assert deadline_s(JobSpec(prompt="x", deadline_s=5), LimitSettings(job_deadline_s=30)) == 5
    assert deadline_s(JobSpec(prompt="x", deadline_s=60), LimitSettings(job_deadline_s=30)) == 30
    task = StageTask(job=JobSpec(prompt="x", deadline_s=2), stage="denoise", submitted_at=100.0)
    check_deadline(task, LimitSettings(), "here", now=102.0)
    with pytest.raises(LimitError, match=r"deadline_s: the job passed its deadline of 2 s after submission \(2.5 s here\)"):
        check_deadline(task, LimitSettings(), "here", now=102.5)


def test_the_denoising_loop_stops_only_once_every_job_of_the_batch_is_late() -> None:
    now = time.time()
    late = StageTask(job=JobSpec(prompt="x", deadline_s=1), stage="denoise", submitted_at=now - 5)
    timely = StageTask(job=JobSpec(prompt="x", deadline_s=60), stage="denoise", submitted_at=now)
    steps: list[int] = []
    on_step = stop_when_late([late, timely], LimitSettings(), lambda step, total: steps.append(step))
    on_step(1, 3)  # one job still has time: the batch runs on
    with pytest.raises(LimitError, match="stopped at step 1 of 3"):
        stop_when_late([late], LimitSettings(), lambda step, total: None)(1, 3)
    stop_when_late([late], LimitSettings(), lambda step, total: None)(3, 3)  # the last step: nothing left to save
    assert steps == [1]


# ------------------------------------------------------------------ against a real nats-server


async def test_the_client_refuses_a_1mb_prompt_at_once_and_queues_nothing(nats_server: str) -> None:
    spec = JobSpec(prompt="x" * 1_000_000, model="limits1")
    async with Client(Settings(nats_url=nats_server)) as client:
        started = time.monotonic()
        with pytest.raises(LimitError, match=r"prompt: 1000000 bytes .* limit of 65536 bytes \(DF_MAX_PROMPT_BYTES\)"):
            await client.submit(spec)
        assert time.monotonic() - started < 5
        info = await client.bus.js.stream_info(WORK_STREAM, subjects_filter=work_subject("encode", "limits1"))
        assert not info.state.subjects


async def _drain_queue(js, model: str) -> list[str]:
    """Take every task queued for ``model``'s entry stage: the job ids, in order."""
    sub = await js.pull_subscribe(work_subject("encode", model), durable=f"encode-{model}", stream=WORK_STREAM)
    ids = []
    while True:
        try:
            msgs = await sub.fetch(10, timeout=1.0)
        except TimeoutError:
            break
        for msg in msgs:
            ids.append(unpack(StageTask, msg.data).job.job_id)
            await msg.ack_sync()
    await js.delete_consumer(WORK_STREAM, f"encode-{model}")
    return ids


async def test_a_submission_over_the_queue_depth_is_refused_and_the_accepted_are_kept(nats_server: str) -> None:
    specs = [JobSpec(prompt="x", model="depth", seed=i) for i in range(4)]
    async with Client(Settings(nats_url=nats_server, max_queue_depth=3)) as client:
        assert await entry_backlog(client.bus.js) == 0
        for spec in specs[:3]:
            await client.submit(spec)
        with pytest.raises(QueueFull, match=r"holds 3 jobs waiting to start and takes at most 3 \(DF_MAX_QUEUE_DEPTH\)"):
            await client.submit(specs[3])
        with pytest.raises(QueueFull):
            [result async for result in client.run_many(specs[3:], timeout=1)]
        assert await _drain_queue(client.bus.js, "depth") == [spec.job_id for spec in specs[:3]]


async def test_a_full_work_stream_refuses_new_tasks_and_keeps_the_accepted(nats_server: str) -> None:
    """Without the client's queue depth, the stream's own limit refuses the publish (discard
    policy new): the tasks it holds stay, and a task is taken again once one is consumed."""
    specs = [JobSpec(prompt="x", model="full", seed=i) for i in range(4)]
    settings = Settings(nats_url=nats_server, max_queue_depth=0, work_max_msgs=3)
    try:
        async with Client(settings) as client:
            for spec in specs[:3]:
                await client.submit(spec)
            with pytest.raises(QueueFull, match=r"work stream is full .*DF_WORK_MAX_MSGS"):
                await client.submit(specs[3])
            assert await _drain_queue(client.bus.js, "full") == [spec.job_id for spec in specs[:3]]
            await client.submit(specs[3])  # room again
            assert await _drain_queue(client.bus.js, "full") == [specs[3].job_id]
    finally:  # the module's server is shared: give DF_WORK back its default limits
        await _reset_limits(nats_server)


async def _reset_limits(nats_url: str) -> None:
    defaults = Settings()
    stack = await bus.connect(Settings(nats_url=nats_url, work_max_msgs=defaults.work_max_msgs,
                                       results_max_bytes=defaults.results_max_bytes), "test")
    await stack.close()


async def test_changed_stream_limits_update_the_existing_streams_but_never_drop_accepted_work(nats_server: str) -> None:
    stack = await bus.connect(Settings(nats_url=nats_server, work_max_msgs=50, results_max_bytes=10_000_000), "a")
    info = await stack.js.stream_info(WORK_STREAM)
    assert (info.config.max_msgs, info.config.discard) == (50, "new")
    assert (await stack.js.stream_info("DF_RESULTS")).config.max_bytes == 10_000_000
    async with Client(Settings(nats_url=nats_server, max_queue_depth=0)) as client:
        for seed in range(3):
            await client.submit(JobSpec(prompt="x", model="shrink", seed=seed))
    # A client whose settings do not name the limits leaves those the stream has.
    assert (await stack.js.stream_info(WORK_STREAM)).config.max_msgs == 50
    # Lowering DF_WORK below what it holds would make JetStream drop tasks: it is left as it is.
    await (await bus.connect(Settings(nats_url=nats_server, work_max_msgs=2), "b")).close()
    assert (await stack.js.stream_info(WORK_STREAM)).config.max_msgs == 50
    assert len(await _drain_queue(stack.js, "shrink")) == 3
    await _reset_limits(nats_server)
    assert (await stack.js.stream_info(WORK_STREAM)).config.max_msgs == Settings().work_max_msgs
    assert (await stack.js.stream_info("DF_RESULTS")).config.max_bytes == -1
    await stack.close()


async def test_large_outputs_are_kept_as_long_as_results_and_within_their_byte_limit(nats_server: str) -> None:
    stack = await bus.connect(Settings(nats_url=nats_server), "test")
    await bus.outputs_bucket(stack.js, Settings(results_max_age_s=600))
    info = await stack.js.stream_info("OBJ_DF_OUTPUTS")
    assert (info.config.max_age, info.config.max_bytes) == (600, -1)
    await bus.outputs_bucket(stack.js, Settings(results_max_age_s=900, outputs_max_bytes=10_000_000))
    info = await stack.js.stream_info("OBJ_DF_OUTPUTS")
    assert (info.config.max_age, info.config.max_bytes) == (900, 10_000_000)
    await stack.close()
