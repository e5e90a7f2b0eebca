"""The gateway's Prometheus metrics, served at ``GET /metrics`` on its HTTP port: its requests
(by route template, so job ids never become labels), the JetStream backlog per stage read at
scrape time, and whatever else this process registered (``disagfusion.metrics``)."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.backlog import stage_backlog

log = logging.getLogger(__name__)

REQUESTS = Counter("disagfusion_gateway_requests", "HTTP requests answered", ["method", "route", "status"])
REQUEST_SECONDS = Histogram("disagfusion_gateway_request_seconds",
                            "Seconds from a request's arrival to the end of its answer (a stream's whole length)",
                            ["method", "route"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
BACKLOG = Gauge("disagfusion_stage_backlog_tasks", "Tasks queued or running per stage in JetStream (pending + "
                "ack-pending of the stage's consumers), read at scrape time", ["stage"])
NATS_UP = Gauge("disagfusion_gateway_nats_up", "1 when the last scrape could read the backlog from NATS, else 0")

UNMATCHED = "unmatched"
"""The route label of a request no route matched: any path, one label."""


class RequestMetrics:
    """ASGI middleware counting and timing each HTTP request by method, route template and
    status. Plain ASGI rather than BaseHTTPMiddleware, so streamed answers (server-sent
    events, video downloads) pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", UNMATCHED)
            REQUESTS.labels(scope["method"], route, str(status)).inc()
            REQUEST_SECONDS.labels(scope["method"], route).observe(time.perf_counter() - started)


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def scrape(request: Request) -> Response:
    """Prometheus text format; never needs an API key, and answers at once when NATS is away
    (the backlog gauges are then absent and ``disagfusion_gateway_nats_up`` is 0)."""
    backend = request.app.state.backend
    try:
        backlog = await stage_backlog(backend.client().bus.js)
    except Exception as exc:  # NATS away or slow: the other metrics still count
        log.debug("backlog not read for /metrics: %r", exc)
        BACKLOG.clear()
        NATS_UP.set(0)
    else:
        for stage, tasks in backlog.items():
            BACKLOG.labels(stage).set(tasks)
        NATS_UP.set(1)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
