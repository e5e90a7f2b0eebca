"""Bad input ends in an error result naming the problem, within seconds, and a terminated
message: never a redelivery loop, never a silent drop."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest

from disagfusion import bus
from disagfusion.client import Client
from disagfusion.protocol import WORK_STREAM, JobSpec, consumer_name, new_job_id, task_msg_id, work_subject

GOOD = JobSpec(prompt="x", steps=2, width=64, height=64).model_dump(mode="python")


def task_bytes(**job_changes) -> tuple[str, bytes]:
    job = {**GOOD, "job_id": new_job_id(), **job_changes}
    return job["job_id"], msgpack.packb({"v": 1, "job": job, "stage": "encode"})


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"steps": 0}, "steps", "greater than or equal to 1"),
        ({"height": 68}, "height", "not a multiple of 8"),
        ({"width": 100}, "width", "not a multiple of 8"),
        ({"model": "nosuchmodel"}, "model", "unknown model 'nosuchmodel'"),
        ({"frames": 4}, "frames", ""),
    ],
)
async def test_invalid_spec_gets_error_result_naming_the_field(stack, changes, field, words) -> None:
    job_id, payload = task_bytes(**changes)
    model = changes.get("model", "tiny")
    async with Client(stack.client_settings()) as client:
        started = time.monotonic()
        await bus.publish(client._js, work_subject("encode", model), payload, task_msg_id(job_id, "encode"))
        result = await client.result(job_id, timeout=5)
        assert time.monotonic() - started < 5
        assert result.status == "error"
        assert result.field == field, result.error
        assert words in result.error
        await _assert_nothing_left(client, model)


async def test_undecodable_message_is_terminated(stack) -> None:
    async with Client(stack.client_settings()) as client:
        await bus.publish(client._js, work_subject("encode", "tiny"), b"\xc1 not msgpack", new_job_id())
        # a well-formed job sent right after is still served: the worker did not wedge
        result = await client.generate(JobSpec(prompt="after garbage", steps=2, width=64, height=64), timeout=60)
        assert result.status == "ok"
        await _assert_nothing_left(client, "tiny")


async def _assert_nothing_left(client: Client, model: str) -> None:
    """The message is gone from the work queue and was not redelivered."""
    deadline = time.monotonic() + 5
    while True:
        info = await client._js.stream_info(WORK_STREAM, subjects_filter=work_subject("encode", model))
        if not info.state.subjects or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert not info.state.subjects, f"messages left in the work queue: {info.state.subjects}"
    if model == "tiny":
        consumer = await client._js.consumer_info(WORK_STREAM, consumer_name("encode", model))
        assert consumer.num_ack_pending == 0 and consumer.num_redelivered == 0
