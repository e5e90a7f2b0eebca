"""Jobs by id: what this gateway remembers of the jobs it submitted (to tell "queued" or "in
progress" before a result exists), and ``GET /v1/jobs/{id}`` and ``POST /v1/jobs/{id}/cancel``
for any job, also one a batch pipeline published straight to NATS, read from its state in
DF_JOBS and its result in DF_RESULTS."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from fastapi import APIRouter, Request, Response
from nats.aio.subscription import Subscription
from pydantic import BaseModel

from disagfusion.client import Client
from disagfusion.job_state import CancelPending
from disagfusion.protocol import JobSpec, JobState, ProgressEvent, Result, events_subject, is_job_id, unpack
from services.gateway.errors import ApiError

MAX_REMEMBERED = 10_000
"""Jobs remembered at once; the oldest are forgotten first (their results still answer)."""


class JobRecord(BaseModel):
    spec: JobSpec
    created_at: int
    progress: int = 0
    """Percent: encoding is the first 10, denoising steps the next 80, decoding the rest."""
    started: bool = False


def progress_of(event: ProgressEvent) -> int | None:
    """The percentage a progress event stands for; None for one that does not move it."""
    if event.kind == "step" and event.total:
        return 10 + 80 * event.step // event.total
    if event.kind == "stage_done":
        return {"encode": 10, "denoise": 90}.get(event.stage or "")
    return 99 if event.kind == "done" else None


def progress_of_state(state: JobState | None) -> int:
    """The percentage a job state stands for (for a job this gateway does not follow)."""
    if state is None or state.state != "running":
        return 0
    if state.stage == "denoise" and state.step is not None and state.total:
        return 10 + 80 * state.step // state.total
    return {"encode": 0, "denoise": 10, "decode": 90}.get(state.stage or "", 0)


class Jobs:
    def __init__(self) -> None:
        self._records: OrderedDict[str, JobRecord] = OrderedDict()
        self._events: dict[str, Subscription] = {}

    def add(self, spec: JobSpec) -> JobRecord:
        record = self._records[spec.job_id] = JobRecord(spec=spec, created_at=int(time.time()))
        while len(self._records) > MAX_REMEMBERED:
            self._records.popitem(last=False)
        return record

    def get(self, job_id: str) -> JobRecord | None:
        return self._records.get(job_id)

    def forget(self, job_id: str) -> None:
        self._records.pop(job_id, None)

    async def follow(self, client: Client, record: JobRecord) -> None:
        """Keep ``record.progress`` current from the job's progress events until ``settled``."""

        async def on_event(msg) -> None:
            event = unpack(ProgressEvent, msg.data)
            record.started = True
            percent = progress_of(event)
            if percent is not None:
                record.progress = max(record.progress, percent)
            if event.kind in ("done", "error"):  # its last event: stop listening (not from inside this callback)
                asyncio.get_running_loop().create_task(self.settled(event.job_id))

        self._events[record.spec.job_id] = await client.bus.nc.subscribe(events_subject(record.spec.job_id), cb=on_event)

    async def settled(self, job_id: str) -> None:
        """The job has its result: stop following its events."""
        sub = self._events.pop(job_id, None)
        if sub is not None:
            await sub.unsubscribe()


router = APIRouter()


STATUSES = {"ok": "completed", "error": "failed", "cancelled": "cancelled"}
"""A result's status → the job's status here."""


def job_view(job_id: str, record: JobRecord | None, result: Result | None, base_url: str,
             state: JobState | None = None) -> dict:
    if result is None:
        started = (record is not None and record.started) or (state is not None and state.state == "running")
        view = {"id": job_id, "object": "job", "status": "in_progress" if started else "queued",
                "progress": max(record.progress if record else 0, progress_of_state(state))}
        if state is not None and state.state == "running":
            view.update(stage=state.stage, step=state.step, total=state.total)
        return view
    view = {"id": job_id, "object": "job", "status": STATUSES[result.status],
            "progress": 100, **result.model_dump(exclude={"v", "job_id", "status", "data"})}
    if result.status == "ok":
        view["content_url"] = f"{base_url}v1/jobs/{job_id}/content"
    return view


async def find(request: Request, job_id: str) -> tuple[JobRecord | None, Result | None, JobState | None]:
    """What is known of a job: this gateway's record, its result, and (without a result) its
    state in DF_JOBS; 404 when nothing is."""
    record = request.app.state.jobs.get(job_id)
    client = request.app.state.backend.client()
    result = await client.lookup(job_id) if is_job_id(job_id) else None
    state = await client.state(job_id) if result is None else None
    if record is None and result is None and state is None:
        raise ApiError(404, f"no job {job_id!r}: none was submitted here and none has a state or result",
                       param="id", code="not_found")
    return record, result, state


async def cancel(request: Request, job_id: str) -> tuple[JobRecord | None, Result]:
    """Cancel a job (``disagfusion.job_state.cancel``): 404 for a job nobody knows, 409 for one
    that finished before it could be, 503 while no stage answers (the job stays marked, and is
    answered when a stage takes it); a job cancelled before is cancelled again, harmlessly."""
    jobs: Jobs = request.app.state.jobs
    record = jobs.get(job_id)
    try:
        result = await request.app.state.backend.client().cancel(job_id, known=record is not None) \
            if is_job_id(job_id) else None
    except CancelPending as exc:
        raise ApiError(503, str(exc), code="cancel_pending") from None
    if result is None:
        raise ApiError(404, f"no job {job_id!r}: none was submitted here and none has a state or result",
                       param="id", code="not_found")
    if result.status != "cancelled":
        raise ApiError(409, f"job {job_id} finished ({STATUSES[result.status]}) before it could be cancelled",
                       code="already_finished")
    await jobs.settled(job_id)
    return record, result


async def output(request: Request, job_id: str) -> tuple[Result, bytes]:
    """A finished job's output bytes; 404 for an unknown job, 409 for one without output yet."""
    _, result, _ = await find(request, job_id)
    if result is None:
        raise ApiError(409, f"job {job_id} has no output yet; it is still running", code="not_ready")
    if result.status == "cancelled":
        raise ApiError(409, f"job {job_id} was {result.error}", code="cancelled")
    if result.status != "ok":
        raise ApiError(409, f"job {job_id} failed at {result.stage}: {result.error}", code="job_failed")
    return result, await request.app.state.backend.client().output(result)


@router.get("/v1/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> dict:
    record, result, state = await find(request, job_id)
    return job_view(job_id, record, result, str(request.base_url), state)


@router.post("/v1/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str) -> dict:
    record, result = await cancel(request, job_id)
    return job_view(job_id, record, result, str(request.base_url))


@router.get("/v1/jobs/{job_id}/content")
async def get_job_content(request: Request, job_id: str) -> Response:
    result, data = await output(request, job_id)
    return Response(data, media_type=result.content_type)
