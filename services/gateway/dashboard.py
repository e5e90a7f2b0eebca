"""The live dashboard: ``/`` (a static page and the vendored chart library under ``/static``)
and ``GET /v1/dashboard``, the JSON the page polls: instances per stage, backlog, throughput
and p95 latency over the last minutes, and the recent jobs with links to their output."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from disagfusion.protocol import STAGES
from disagfusion.scheduler_state import read_status
from services.gateway.backend import Backend
from services.gateway.backlog import stage_backlog
from services.gateway.observer import BUCKET_S, WINDOW_S, Observer, SeenJob, p95

STATIC = Path(__file__).parent / "static"
RECENT_JOBS = 12

page = APIRouter()
"""What a browser loads without a key: the page asks for one when the API wants it."""
router = APIRouter()


class StageView(BaseModel):
    stage: str
    service: str
    running: int
    """Workers that announced themselves within the last 15 s."""
    desired: int | None
    """The scheduler's target; None when no scheduler runs."""
    backlog: int
    """Tasks queued or held by a worker."""


class Series(BaseModel):
    """The chart, column by column (as uPlot takes it): one point per bucket of the window."""

    t: list[float]
    throughput_per_min: list[float | None]
    """None for the buckets before the gateway started listening."""
    p95_s: list[float | None]


class JobView(BaseModel):
    id: str
    model: str | None
    """None for a job submitted before the gateway started listening."""
    prompt: str | None
    status: str
    """``pending`` (no result yet), ``completed`` or ``failed``."""
    seconds: float
    """Submitted to finished; for a pending job, so far."""
    error: str | None
    job_url: str
    content_url: str | None
    thumbnail_url: str | None


class DashboardView(BaseModel):
    t: float
    scheduler: bool
    """Whether a scheduler runs (its desired counts are shown)."""
    stages: list[StageView]
    completed: int
    failed: int
    """Results seen since the gateway started."""
    throughput_per_min: float
    """Results per minute over the last minute."""
    p95_s: float | None
    """95th percentile of submitted-to-finished seconds over the window."""
    window_s: float
    bucket_s: float
    series: Series
    jobs: list[JobView]


def job_view(job: SeenJob, now: float) -> JobView:
    result, base = job.result, f"/v1/jobs/{job.job_id}"
    if result is None:
        return JobView(id=job.job_id, model=job.model, prompt=job.prompt, status="pending",
                       seconds=max(0.0, now - job.submitted_at), error=None, job_url=base, content_url=None,
                       thumbnail_url=None)
    ok = result.status == "ok"
    image = ok and (result.content_type or "").startswith("image/")
    return JobView(id=job.job_id, model=job.model, prompt=job.prompt, status="completed" if ok else "failed",
                   seconds=max(0.0, result.finished_at - job.submitted_at), error=result.error, job_url=base,
                   content_url=f"{base}/content" if ok else None, thumbnail_url=f"{base}/thumbnail" if image else None)


@page.get("/", include_in_schema=False)
async def dashboard_page() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html")


@router.get("/v1/dashboard")
async def dashboard(request: Request) -> DashboardView:
    observer: Observer = request.app.state.observer
    js = request.app.state.backend.client().bus.js
    now = time.time()
    backlog = await stage_backlog(js)
    scheduler = await read_status(js)
    desired = {state.stage: state.desired for state in scheduler.stages} if scheduler and scheduler.fresh(now) else None
    running = observer.running(now)
    stages = [StageView(stage=stage, service=stage.service, running=running.get(stage, 0),
                        desired=desired.get(stage) if desired is not None else None, backlog=backlog[stage])
              for stage in STAGES]
    t, rates, latencies = observer.series(now)
    return DashboardView(
        t=now, scheduler=desired is not None, stages=stages, completed=observer.completed, failed=observer.failed,
        throughput_per_min=observer.throughput_per_min(now), p95_s=p95([f.latency_s for f in observer.window(now)]),
        window_s=WINDOW_S, bucket_s=BUCKET_S, series=Series(t=t, throughput_per_min=rates, p95_s=latencies),
        jobs=[job_view(job, now) for job in observer.recent(RECENT_JOBS)],
    )


async def observe(backend: Backend, observer: Observer) -> None:
    """The observer's subscriptions, made once the backend has connected (in the background)."""
    while not backend.connected:
        await asyncio.sleep(0.2)
    await observer.listen(backend.client().bus.nc)
