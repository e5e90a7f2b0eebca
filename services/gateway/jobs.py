"""Jobs by id: what this gateway remembers of the jobs it submitted (to tell "queued" or "in
progress" before a result exists), and ``GET /v1/jobs/{id}`` for any job, also one a batch
pipeline published straight to NATS, read from its result in DF_RESULTS."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from fastapi import APIRouter, Request, Response
from nats.aio.subscription import Subscription
from pydantic import BaseModel

from disagfusion.client import Client
from disagfusion.protocol import JobSpec, ProgressEvent, Result, events_subject, is_token, unpack
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


def job_view(job_id: str, record: JobRecord | None, result: Result | None, base_url: str) -> dict:
    if result is None:
        status = "in_progress" if record is not None and record.started else "queued"
        return {"id": job_id, "object": "job", "status": status, "progress": record.progress if record else 0}
    view = {"id": job_id, "object": "job", "status": "completed" if result.status == "ok" else "failed",
            "progress": 100, **result.model_dump(exclude={"v", "job_id", "status", "data"})}
    if result.status == "ok":
        view["content_url"] = f"{base_url}v1/jobs/{job_id}/content"
    return view


async def find(request: Request, job_id: str) -> tuple[JobRecord | None, Result | None]:
    """What is known of a job; 404 when nothing is (no record here, no result in DF_RESULTS)."""
    record = request.app.state.jobs.get(job_id)
    result = await request.app.state.backend.client().lookup(job_id) if is_token(job_id) else None
    if record is None and result is None:
        raise ApiError(404, f"no job {job_id!r}: none was submitted here and none has a result", param="id",
                       code="not_found")
    return record, result


async def output(request: Request, job_id: str) -> tuple[Result, bytes]:
    """A finished job's output bytes; 404 for an unknown job, 409 for one without output yet."""
    _, result = await find(request, job_id)
    if result is None:
        raise ApiError(409, f"job {job_id} has no output yet; it is still running", code="not_ready")
    if result.status != "ok":
        raise ApiError(409, f"job {job_id} failed at {result.stage}: {result.error}", code="job_failed")
    return result, await request.app.state.backend.client().output(result)


@router.get("/v1/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> dict:
    record, result = await find(request, job_id)
    return job_view(job_id, record, result, str(request.base_url))


@router.get("/v1/jobs/{job_id}/content")
async def get_job_content(request: Request, job_id: str) -> Response:
    result, data = await output(request, job_id)
    return Response(data, media_type=result.content_type)
