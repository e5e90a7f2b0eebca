"""The gateway's FastAPI application: its routers, bearer keys, the body limit, errors in
OpenAI's shape, ``GET /v1/models`` and ``GET /healthz``."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats.errors
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from disagfusion.credentials import redact
from disagfusion.limits import LimitError, QueueFull
from services.gateway import dashboard, events, images, jobs, metrics, thumbnails, videos
from services.gateway.backend import Backend
from services.gateway.config import GatewaySettings
from services.gateway.errors import (
    ApiError,
    api_error_handler,
    error_response,
    http_error_handler,
    limit_error_handler,
    queue_full_handler,
    validation_error_handler,
)
from services.gateway.limits import BodyLimit
from services.gateway.observer import Observer


def require_key(request: Request) -> None:
    """401 unless the request carries one of DF_API_KEYS as its bearer token (when any is set)."""
    keys = request.app.state.settings.api_key_list
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not any(secrets.compare_digest(token.encode(), key.encode()) for key in keys):
        raise ApiError(401, "a valid API key is needed: send it as 'Authorization: Bearer KEY'",
                       code="invalid_api_key")


async def nats_error_handler(_: Request, exc: nats.errors.Error) -> JSONResponse:
    """A NATS call that failed mid-request (a server restart, a timeout): the queue is away."""
    return error_response(503, f"the job queue did not answer: {exc!r}; retry shortly", code="service_unavailable")


def model_object(name: str) -> dict:
    """OpenAI's ``Model`` object; ``created`` is now, as a served model has no date of its own."""
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "disagfusion"}


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    backend = Backend(settings)
    observer = Observer()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        observing = asyncio.create_task(dashboard.observe(backend, observer))
        try:
            yield
        finally:
            observing.cancel()
            await backend.stop()

    app = FastAPI(title="DisagFusion gateway", lifespan=lifespan)
    app.state.settings, app.state.backend, app.state.jobs = settings, backend, jobs.Jobs()
    app.state.observer = observer
    app.add_middleware(BodyLimit, max_bytes=settings.gateway_max_body_bytes)
    app.add_middleware(metrics.RequestMetrics)  # added last: outermost, so it sees every answer
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(nats.errors.Error, nats_error_handler)
    app.add_exception_handler(LimitError, limit_error_handler)
    app.add_exception_handler(QueueFull, queue_full_handler)
    for router in (images.router, videos.router, jobs.router, events.router, dashboard.router, thumbnails.router):
        app.include_router(router, dependencies=[Depends(require_key)])
    app.include_router(metrics.router)  # no key: scrapers carry none, and it holds no job data
    app.include_router(dashboard.page)
    app.mount("/static", StaticFiles(directory=dashboard.STATIC), name="static")

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def list_models() -> dict:
        return {"object": "list", "data": [model_object(name) for name in await backend.models()]}

    @app.get("/v1/models/{model}", dependencies=[Depends(require_key)])
    async def retrieve_model(model: str) -> dict:
        if model not in await backend.models():
            raise ApiError(404, f"the model {model!r} is not served here", param="model", code="model_not_found")
        return model_object(model)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """200 while the gateway can reach NATS, 503 while it cannot."""
        if backend.connected:
            return JSONResponse({"status": "ok", "nats": redact(settings.nats_url)})
        return error_response(503, f"NATS at {redact(settings.nats_url)} is not reachable", code="service_unavailable")

    return app
