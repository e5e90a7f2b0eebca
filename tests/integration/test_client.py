"""The client's view of a job: progress events while it runs, one result at the end."""

from __future__ import annotations

from disagfusion.client import Client, JobTimeout
from disagfusion.protocol import STAGES, JobSpec, ProgressEvent

import pytest


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
