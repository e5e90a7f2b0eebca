"""Job state, cancel and server-sent events through a stack of real stage processes: the
states a job goes through in DF_JOBS, a job's events read as SSE with an HTTP client, and a
video cancelled mid-denoise with the official OpenAI SDK (``client.videos.delete``), which
stops within a step, gets one ``cancelled`` result and leaves no tensor behind."""

from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid

import httpx2
import openai
import pytest
from typer.testing import CliRunner

from disagfusion.client import Client
from disagfusion.launcher import Launcher
from disagfusion.protocol import RESULTS_STREAM, JobSpec, JobState, job_state_key, results_subject, unpack
from disagfusion.transport.shm import DELETED, READY, SLOT_NAME, WRITING, unpack_word
from disagfusion_cli import app

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


def read_events(url: str, timeout: float = 60.0) -> list[tuple[str, dict]]:
    """Every event of a server-sent event stream, until the server ends it."""
    events, name = [], None
    with httpx2.stream("GET", url, timeout=timeout) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        for line in answer.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def held_slots(launcher: Launcher) -> list[str]:
    """The stack's shm slots that still hold a tensor (being written, ready, or deleted but pinned)."""
    held = []
    for path in launcher._own_shm_dir().iterdir():
        if SLOT_NAME.fullmatch(path.name):
            with open(path, "rb") as slot:
                word, = struct.unpack("<Q", slot.read(8))
            if unpack_word(word)[2] in (WRITING, READY, DELETED):
                held.append(path.name)
    return held


async def test_a_jobs_states_go_from_queued_through_each_stage_to_done(gateway_stack: Launcher) -> None:
    spec = JobSpec(prompt="a state machine", width=64, height=64, steps=6)
    async with Client(gateway_stack.client_settings(), "test") as client:
        watcher = await (await client.jobs_bucket()).watch(job_state_key(spec.job_id))
        result = await client.generate(spec)
        assert result.status == "ok"
        states: list[JobState] = []
        while not states or states[-1].state != "done":
            entry = await watcher.updates(timeout=20)
            if entry is not None:
                states.append(unpack(JobState, entry.value))
        await watcher.stop()
    seen = [(state.state, state.stage) for state in states]
    compressed = [pair for i, pair in enumerate(seen) if i == 0 or pair != seen[i - 1]]
    # "queued" is written after the publish, unless the encoder wrote first (it then is not written).
    assert compressed in ([("queued", None)] + STAGES_DONE, STAGES_DONE), seen
    steps = [state.step for state in states if state.stage == "denoise" and state.step is not None]
    assert steps == sorted(steps) and steps[-1] == 6, steps  # the last step is always written
    assert {state.by.split("@")[0] for state in states if state.state != "queued"} >= {"encoder", "dit", "decoder"}


STAGES_DONE = [("running", "encode"), ("running", "denoise"), ("running", "decode"), ("done", "decode")]


async def test_a_jobs_events_stream_ends_with_its_result(gateway_url: str, gateway_stack: Launcher) -> None:
    """A job published straight to NATS (as a batch pipeline does) streams too: its state first,
    then the progress of every stage, last its result."""
    # 40 steps of about 50 ms (emulated Wan2.1 on an H200: simulated time), so the stream opens
    # well before the job ends however quiet the machine.
    spec = JobSpec(model="emulated-video", prompt="a stream", width=128, height=128, frames=17, steps=40, guidance=1.0)
    async with Client(gateway_stack.client_settings(), "batch-pipeline") as client:
        await client.submit(spec)
        # Not submitted through the gateway, and no result yet: its state in DF_JOBS answers.
        job = (await asyncio.to_thread(httpx2.get, f"{gateway_url}/v1/jobs/{spec.job_id}")).json()
        assert job["status"] in ("queued", "in_progress"), job
        events = await asyncio.to_thread(read_events, f"{gateway_url}/v1/jobs/{spec.job_id}/events")
        assert (await client.result(spec.job_id)).status == "ok"
    names = [name for name, _ in events]
    assert names[0] == "state" and names[-1] == "result" and set(names[1:-1]) == {"progress"}, names
    assert events[0][1]["state"] in ("queued", "running")
    kinds = [data["kind"] for name, data in events if name == "progress"]
    steps = [data["step"] for name, data in events if name == "progress" and data["kind"] == "step"]
    assert "done" in kinds and steps and steps == sorted(steps) and steps[-1] == 40
    assert events[-1][1]["status"] == "completed" and events[-1][1]["content_url"].endswith("/content")
    # Once finished, the stream is the state and the result at once.
    again = await asyncio.to_thread(read_events, f"{gateway_url}/v1/jobs/{spec.job_id}/events")
    assert [(name, data.get("state", data.get("status"))) for name, data in again] == [("state", "done"),
                                                                                        ("result", "completed")]
    status, body = await asyncio.to_thread(
        lambda: (lambda r: (r.status_code, r.json()))(httpx2.get(f"{gateway_url}/v1/jobs/{uuid.uuid4().hex}/events")))
    assert status == 404 and body["error"]["code"] == "not_found"


def test_a_video_deleted_mid_denoise_stops_within_a_step_and_leaves_nothing(
        sdk: openai.OpenAI, gateway_url: str, gateway_stack: Launcher) -> None:
    # 200 steps of about 50 ms (emulated Wan2.1 on an H200: simulated time)
    video = sdk.videos.create(model="emulated-video", prompt="a long take", size="128x128",
                              extra_body={"frames": 17, "num_inference_steps": 200, "guidance_scale": 1.0})
    deadline = time.monotonic() + 60
    while (progress := sdk.videos.retrieve(video.id).progress) < 12:  # a few steps into denoising
        assert time.monotonic() < deadline, "the video never reached its denoising steps"
        time.sleep(0.05)
    deleted = sdk.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    cancelled = sdk.videos.retrieve(video.id)
    assert cancelled.status == "failed" and cancelled.error.code == "cancelled", cancelled
    with pytest.raises(openai.ConflictError):
        sdk.videos.download_content(video.id)
    job = httpx2.get(f"{gateway_url}/v1/jobs/{video.id}").json()
    assert job["status"] == "cancelled"

    async def final_state() -> JobState:
        async with Client(gateway_stack.client_settings(), "test") as client:
            deadline = time.monotonic() + 20
            while True:
                state = await client.state(video.id)
                if state is not None and state.stage == "denoise" or time.monotonic() > deadline:
                    info = await client.bus.js.stream_info(RESULTS_STREAM, subjects_filter=results_subject(video.id))
                    assert sum((info.state.subjects or {}).values()) == 1, "not exactly one result"
                    return state
                await asyncio.sleep(0.1)

    state = asyncio.run(final_state())
    assert state.state == "cancelled" and state.stage == "denoise", state  # the dit dropped it, in its loop
    assert state.step is not None and state.step < 200
    deadline = time.monotonic() + 20
    while held := held_slots(gateway_stack):
        assert time.monotonic() < deadline, f"tensors left in shm: {held}"
        time.sleep(0.2)
    # Cancelling again is harmless; a finished job cannot be cancelled.
    assert sdk.videos.delete(video.id).deleted
    done = sdk.videos.create(model="emulated-video", prompt="short", size="64x32",
                             extra_body={"frames": 9, "num_inference_steps": 2, "guidance_scale": 1.0})
    while sdk.videos.retrieve(done.id).status in ("queued", "in_progress"):
        time.sleep(0.1)
    with pytest.raises(openai.ConflictError):
        sdk.videos.delete(done.id)


def test_the_cli_and_the_jobs_api_cancel_any_job(gateway_url: str, gateway_stack: Launcher) -> None:
    async def submit(spec: JobSpec) -> None:
        async with Client(gateway_stack.client_settings(), "batch-pipeline") as client:
            await client.submit(spec)

    by_cli, by_http = (JobSpec(model="emulated-video", prompt="p", width=128, height=128, frames=17, steps=500,
                               guidance=1.0) for _ in range(2))
    for spec in (by_cli, by_http):
        asyncio.run(submit(spec))
    cancel = CliRunner().invoke(app, ["cancel", by_cli.job_id, "--data-dir", str(gateway_stack.data_dir)])
    assert cancel.exit_code == 0 and f"cancelled job {by_cli.job_id}" in cancel.output, cancel.output
    answer = httpx2.post(f"{gateway_url}/v1/jobs/{by_http.job_id}/cancel")
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled", answer.text
    unknown = CliRunner().invoke(app, ["cancel", uuid.uuid4().hex, "--data-dir", str(gateway_stack.data_dir)])
    assert unknown.exit_code == 1 and "no job" in unknown.output
    assert httpx2.post(f"{gateway_url}/v1/jobs/{uuid.uuid4().hex}/cancel").status_code == 404
