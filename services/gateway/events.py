"""``GET /v1/jobs/{id}/events``: a job's progress as server-sent events, for any job (also one a
batch pipeline published straight to NATS). First its state now, then each progress event as
the stages publish it, last its result; then the stream ends::

    event: state     data: the job's JobState (DF_JOBS) as JSON: job_id, state, stage, step, total, by, t
    event: progress  data: a ProgressEvent as JSON (job_id, kind, stage, step, total, t), with
                     ``progress`` (percent, as GET /v1/videos/{id} counts it) where it moves it
    event: result    data: the job as GET /v1/jobs/{id} shows it (status completed, failed or cancelled)

A comment line (``: keep-alive``) every ``KEEPALIVE_S`` keeps proxies from closing a quiet stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from nats.aio.msg import Msg

from disagfusion.protocol import (
    DecodeError,
    JobState,
    ProgressEvent,
    Result,
    events_subject,
    is_job_id,
    results_subject,
    unpack,
)
from services.gateway.errors import ApiError
from services.gateway.jobs import JobRecord, find, job_view, progress_of

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0
_RESULT_STATES = {"ok": "done", "error": "error", "cancelled": "cancelled"}

router = APIRouter()


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def first_state(job_id: str, record: JobRecord | None, result: Result | None, state: JobState | None) -> JobState:
    """The job's state now: its result's if it has one, else DF_JOBS's, else queued (a job this
    gateway submitted whose state is not written yet)."""
    if result is not None:
        return JobState(job_id=job_id, state=_RESULT_STATES[result.status], stage=result.stage, t=result.finished_at)
    return state or JobState(job_id=job_id, state="queued", by="gateway", t=record.created_at if record else 0.0)


@router.get("/v1/jobs/{job_id}/events")
async def job_events(request: Request, job_id: str) -> StreamingResponse:
    if not is_job_id(job_id):
        raise ApiError(404, f"no job {job_id!r}: not a job id", param="id", code="not_found")
    client = request.app.state.backend.client()
    arrived: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def on_event(msg: Msg) -> None:
        arrived.put_nowait(("progress", msg.data))

    async def on_result(msg: Msg) -> None:
        arrived.put_nowait(("result", msg.data))

    # Both before the state is read, so nothing between the read and the stream is missed; the
    # result's ordered consumer also delivers a result stored before it began.
    events = await client.bus.nc.subscribe(events_subject(job_id), cb=on_event)
    results = await client.bus.js.subscribe(results_subject(job_id), ordered_consumer=True, cb=on_result)

    async def unsubscribe() -> None:
        for sub in (events, results):
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection is gone: so is the subscription
                log.debug("unsubscribing the events of job %s: %s", job_id, exc)

    try:
        record, result, state = await find(request, job_id)
    except BaseException:
        await unsubscribe()
        raise
    base_url = str(request.base_url)

    async def stream() -> AsyncIterator[str]:
        try:
            yield sse("state", first_state(job_id, record, result, state).model_dump(mode="json", exclude={"v"}))
            while True:
                try:
                    kind, data = await asyncio.wait_for(arrived.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                try:
                    if kind == "result":
                        final = unpack(Result, data)
                        yield sse("result", job_view(job_id, record, final, base_url))
                        return
                    event = unpack(ProgressEvent, data)
                except DecodeError as exc:  # not ours to fail on: events are best effort
                    log.debug("job %s: an unreadable %s message: %s", job_id, kind, exc)
                    continue
                payload = event.model_dump(mode="json", exclude={"v"})
                percent = progress_of(event)
                if percent is not None:
                    payload["progress"] = percent
                yield sse("progress", payload)
        finally:
            await unsubscribe()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
