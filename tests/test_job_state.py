"""DF_JOBS against a real nats-server: cancel marks reach a worker's set (also those made before
it started), step writes are throttled, ``queued`` never overwrites a stage's state, and cancel
gives a job exactly one result."""

from __future__ import annotations

import asyncio
import time

import pytest

from disagfusion import bus, job_state
from disagfusion.config import Settings
from disagfusion.job_state import JobsCancelled, JobStates
from disagfusion.protocol import (
    RESULTS_STREAM,
    JobSpec,
    JobState,
    ProgressEvent,
    Result,
    cancel_key,
    cancel_subject,
    job_state_key,
    new_job_id,
    pack,
    result_msg_id,
    results_subject,
    unpack,
)


def settings(nats_server: str) -> Settings:
    return Settings(nats_url=nats_server)


async def until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_job_id_is_its_keys_second_token() -> None:
    assert (job_state_key("a_B-9"), cancel_key("a_B-9")) == ("state.a_B-9", "cancel.a_B-9")


async def test_cancel_marks_reach_a_worker_and_a_batch_stops_only_when_all_its_jobs_are_cancelled(
        nats_bus: bus.Bus, nats_server: str) -> None:
    kv = await bus.jobs_bucket(nats_bus.js, settings(nats_server))
    before, after, other = new_job_id(), new_job_id(), new_job_id()
    await kv.put(cancel_key(before), b"")
    states = await JobStates.open(nats_bus, settings(nats_server), "worker")
    try:
        assert states.cancelled(before)  # made before it started: known once open returns
        assert not states.cancelled(after)
        await kv.put(cancel_key(after), pack(JobState(job_id=after, state="cancelled", by="test")))
        await until(lambda: states.cancelled(after))
        states.stop_if_cancelled([after, other], 3, 10)  # the batch runs on for ``other``
        with pytest.raises(JobsCancelled) as stopped:
            states.stop_if_cancelled([before, after], 3, 10)
        assert (stopped.value.step, stopped.value.total) == (3, 10)
        await kv.delete(cancel_key(after))
        await until(lambda: not states.cancelled(after))
    finally:
        await states.close()


async def test_step_writes_are_throttled_and_the_last_step_is_written(nats_bus: bus.Bus, nats_server: str) -> None:
    kv = await bus.jobs_bucket(nats_bus.js, settings(nats_server))
    job_id = new_job_id()
    watcher = await kv.watch(job_state_key(job_id))
    states = await JobStates.open(nats_bus, settings(nats_server), "dit")
    try:
        for step in range(1, 101):  # 100 steps within a few milliseconds
            states.on_event(ProgressEvent(job_id=job_id, kind="step", stage="denoise", step=step, total=100))
        written = []
        while not written or written[-1].step != 100:
            entry = await watcher.updates(timeout=10)
            if entry is not None:
                written.append(unpack(JobState, entry.value))
    finally:
        await watcher.stop()
        await states.close()
    assert [state.step for state in written] == [1, 100]
    assert all(state.state == "running" and state.stage == "denoise" and state.by == "dit" for state in written)


async def test_queued_does_not_overwrite_a_stages_state(nats_bus: bus.Bus, nats_server: str) -> None:
    kv = await bus.jobs_bucket(nats_bus.js, settings(nats_server))
    first, late = new_job_id(), new_job_id()
    await job_state.mark_queued(kv, first, "client")
    assert (await job_state.read_state(kv, first)).state == "queued"
    await kv.put(job_state_key(late), pack(JobState(job_id=late, state="running", stage="encode")))
    await job_state.mark_queued(kv, late, "client")
    assert (await job_state.read_state(kv, late)).state == "running"
    assert await job_state.read_state(kv, "not a job id") is None


async def results_of(js, job_id: str) -> int:
    info = await js.stream_info(RESULTS_STREAM, subjects_filter=results_subject(job_id))
    return sum((info.state.subjects or {}).values())


async def test_a_cancelled_job_gets_exactly_one_result(nats_bus: bus.Bus, nats_server: str) -> None:
    js, config = nats_bus.js, settings(nats_server)
    kv = await bus.jobs_bucket(js, config)
    assert await job_state.cancel(nats_bus, config, new_job_id(), "test") is None  # nobody knows it
    assert await job_state.cancel(nats_bus, config, "no.such job", "test") is None
    stage = await JobStates.open(nats_bus, config, "stage")  # answers the cancel requests
    try:
        queued = new_job_id()
        await job_state.mark_queued(kv, queued, "client")
        result = await job_state.cancel(nats_bus, config, queued, "test")
        assert (result.status, result.error) == ("cancelled", "cancelled by test")
        assert (await job_state.cancel(nats_bus, config, queued, "again")).error == "cancelled by test"
        # A stage that meets the job later publishes nothing more.
        assert (await job_state.publish_cancelled(js, queued, "denoise", "dit")).error == "cancelled by test"
        assert await results_of(js, queued) == 1
        assert (await job_state.read_state(kv, queued)).state == "cancelled"
        assert (await kv.get(cancel_key(queued))).value
        # A request for a job nobody marked is answered empty: nothing is cancelled.
        unmarked = new_job_id()
        assert (await nats_bus.nc.request(cancel_subject(unmarked), b"", timeout=5)).data == b""
        assert await results_of(js, unmarked) == 0

        finished = new_job_id()
        ok = Result(job_id=finished, status="ok", stage="decode")
        await bus.publish(js, results_subject(finished), pack(ok), result_msg_id(finished))
        assert (await job_state.cancel(nats_bus, config, finished, "test", known=True)).status == "ok"
        assert (await job_state.publish_cancelled(js, finished, "decode", "decoder")).status == "ok"
        assert await results_of(js, finished) == 1
    finally:
        await stage.close()
    with pytest.raises(job_state.CancelPending, match="no stage is running"):
        await job_state.cancel(nats_bus, config, new_job_id(), "test", known=True)


async def test_a_job_id_is_claimed_by_its_first_spec(nats_bus: bus.Bus, nats_server: str) -> None:
    kv = await bus.jobs_bucket(nats_bus.js, settings(nats_server))
    spec = JobSpec(job_id=new_job_id(), prompt="a fox", steps=2)
    await job_state.claim(kv, spec)
    await job_state.claim(kv, spec)  # the same job again: a retry, not a second job
    with pytest.raises(job_state.JobIdInUse, match=f"job_id '{spec.job_id}' is already in use"):
        await job_state.claim(kv, spec.model_copy(update={"prompt": "a wolf"}))
