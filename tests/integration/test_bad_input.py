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


# ------------------------------------------------------------------ limits (disagfusion.limits)


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"prompt": "x" * 1_000_000}, "prompt", "1000000 bytes is longer than the limit of 65536 bytes (DF_MAX_PROMPT_BYTES)"),
        # The tiny model's ByT5 tokenizer: a token per byte, and an end token; its text length is 300.
        ({"prompt": "x" * 400}, "prompt", "401 tokens is longer than the limit of 300 tokens (DF_MAX_PROMPT_TOKENS"),
        ({"height": 8192, "width": 8192, "steps": 1000}, None, "over the limit of 20000 (DF_MAX_JOB_MPX_STEPS)"),
    ],
    ids=["1 MB prompt", "token limit", "over-budget size and steps"],
)
async def test_a_job_over_a_limit_ends_within_5_s_with_an_error_naming_it(stack, changes, field, words) -> None:
    """Published as a client in another language would, past the Python client's own checks:
    the encoder refuses it at admission, before any work."""
    await test_invalid_spec_gets_error_result_naming_the_field(stack, changes, field, words)


async def test_a_job_past_its_deadline_ends_with_an_error_within_its_value(stack) -> None:
    """1000 denoising steps take the tiny DiT far longer than the 2 s the job allows: the loop
    stops between steps and the job's error result comes within its deadline (plus a step)."""
    spec = JobSpec(prompt="late", steps=1000, width=256, height=256, deadline_s=2.0)
    async with Client(stack.client_settings()) as client:
        started = time.time()
        result = await client.generate(spec, timeout=30)
    took = result.finished_at - started
    assert (result.status, result.field, result.stage) == ("error", "deadline_s", "denoise"), result.error
    assert "passed its deadline of 2 s after submission" in result.error
    assert took < 2.0 + 1.0, f"the error came {took:.1f} s after submission"
