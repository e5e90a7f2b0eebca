"""The client's view of a job: progress events while it runs, one result at the end."""

from __future__ import annotations

import asyncio
import time

import pytest

from disagfusion import bus
from disagfusion.client import Client, JobTimeout
from disagfusion.protocol import STAGES, WORK_STREAM, JobSpec, ProgressEvent, Stage, StageTask, pack, task_msg_id, work_subject


async def test_progress_events_follow_the_job_through_every_stage(stack) -> None:
    events: list[ProgressEvent] = []
    spec = JobSpec(prompt="progress", steps=4, width=64, height=64)
    async with Client(stack.client_settings()) as client:
        result = await client.generate(spec, events.append, timeout=60)
    assert result.status == "ok"
    seen = [(e.kind, e.stage) for e in events]
    for stage in STAGES:
        assert ("stage_started", stage) in seen and ("stage_done", stage) in seen
    steps = [e.step for e in events if e.kind == "step"]
    assert sorted(steps) == [1, 2, 3, 4] and all(e.total == 4 for e in events if e.kind == "step")
    assert seen[-1] == ("done", "decode")
    assert set(result.timings) == set(STAGES)


async def test_resubmitting_a_job_id_gives_one_result(stack) -> None:
    spec = JobSpec(prompt="twice", steps=2, width=64, height=64)
    async with Client(stack.client_settings()) as client:
        await client.submit(spec)
        await client.submit(spec)  # deduplicated by Nats-Msg-Id
        first = await client.result(spec.job_id, timeout=60)
        assert first.status == "ok"
        info = await client._js.stream_info("DF_RESULTS", subjects_filter=f"df.results.{spec.job_id}")
        assert info.state.subjects == {f"df.results.{spec.job_id}": 1}


async def test_waiting_for_an_unknown_job_times_out_clearly(stack) -> None:
    async with Client(stack.client_settings()) as client:
        with pytest.raises(JobTimeout, match="no result for job nosuchjob within 1 s"):
            await client.result("nosuchjob", timeout=1)


async def test_a_tenant_runs_its_jobs_in_its_own_namespace(start_stack) -> None:
    """docs/security.md "Tenants" on a real stack: tenant acme's jobs run as ``acme.<id>``, with
    events, states and large outputs (in its own bucket) of their own, and the shared namespace's
    pixels; a task on acme's subject naming another tenant's job is not answered in that
    namespace (its result would be a forgery)."""
    launcher = start_stack(tenants=("acme",), DF_RESULT_INLINE_MAX_BYTES="0")  # every PNG is a large output
    spec = JobSpec(prompt="a tenant's lighthouse", seed=7, steps=2, width=64, height=64)
    async with Client(launcher.client_settings()) as admin:
        shared = await admin.generate(spec, timeout=120)
        async with Client(launcher.client_settings("acme")) as acme:
            events: list[ProgressEvent] = []
            mine = await acme.generate(spec, events.append, timeout=120)
            assert (mine.status, mine.job_id, mine.object_name) == ("ok", f"acme.{spec.job_id}", f"acme.{spec.job_id}.png")
            assert await acme.output(mine) == await admin.output(shared)
            assert events[-1].kind == "done" and {e.job_id for e in events} == {mine.job_id}
            deadline = time.monotonic() + 10  # states are written behind the results, best effort
            while (state := await acme.state(spec.job_id)).state != "done" and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert state.state == "done"
            batch = [JobSpec(prompt=f"tenant batch {i}", steps=2, width=64, height=64) for i in range(3)]
            results = [r async for r in acme.run_many(batch, timeout=120)]
            assert sorted(r.job_id for r in results) == sorted(f"acme.{s.job_id}" for s in batch)
            assert all(r.status == "ok" for r in results)
            unserved = await acme.generate(JobSpec(model="nosuch", prompt="p", steps=2, width=64, height=64), timeout=60)
            assert (unserved.status, unserved.field) == ("error", "model") and unserved.job_id.startswith("acme.")

            stolen = JobSpec(job_id="other.stolen", prompt="not acme's", steps=2, width=64, height=64)
            await bus.publish(acme._js, work_subject(Stage.ENCODE, "tiny", "acme"),
                              pack(StageTask(job=stolen, stage=Stage.ENCODE)), task_msg_id(stolen.job_id, Stage.ENCODE))
        deadline = time.monotonic() + 60
        while (await admin._js.stream_info(WORK_STREAM, subjects_filter="df.work.>")).state.messages:
            assert time.monotonic() < deadline, "the foreign task was never taken"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        assert await admin.lookup(stolen.job_id) is None
    logs = "".join(path.read_text() for path in launcher.logs.glob("encoder*.log"))
    assert "not answering job other.stolen" in logs
