"""The gateway's one connection to NATS, made in the background: the gateway starts, and
answers 503, while NATS is away, and serves as soon as it is reachable. While connected it
touches its health file (``disagfusion.health``), like every other service."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack

from disagfusion import limits
from disagfusion.credentials import redact
from disagfusion.client import Client
from disagfusion.config import LimitSettings
from disagfusion.health import health_path, write_health
from disagfusion.protocol import WORK_STREAM, JobSpec
from disagfusion.status import read_stage_status, served_models
from services.gateway.config import GatewaySettings
from services.gateway.errors import ApiError

log = logging.getLogger(__name__)

RECONNECT_S = 1.0


class Backend:
    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.limits = LimitSettings()
        self._client: Client | None = None
        self._exits = AsyncExitStack()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._exits.aclose()

    async def _run(self) -> None:
        while self._client is None:
            try:
                self._client = await self._exits.enter_async_context(Client(self.settings, "gateway", self.limits))
            except Exception as exc:  # refused, timed out, no servers: all mean "not yet"
                log.warning("cannot reach NATS at %s (%s); retrying", redact(self.settings.nats_url), exc)
                await asyncio.sleep(RECONNECT_S)
        log.info("connected to NATS at %s", redact(self.settings.nats_url))
        health = health_path()
        while True:
            if self.connected:
                await asyncio.to_thread(write_health, health, "gateway serving")
            await asyncio.sleep(self.settings.heartbeat_s)

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.bus.nc.is_connected

    def client(self) -> Client:
        """The connected client; 503 while NATS is not reachable."""
        if not self.connected:
            raise ApiError(503, f"the job queue (NATS at {redact(self.settings.nats_url)}) is not reachable; retry shortly",
                           code="service_unavailable")
        return self._client

    async def models(self) -> list[str]:
        """The models every stage has a consumer for."""
        return served_models(await read_stage_status(self.client().bus.js))

    async def backlog(self) -> int:
        """Tasks queued or held by a worker in DF_WORK, over every stage and model."""
        return (await self.client().bus.js.stream_info(WORK_STREAM)).state.messages

    async def admit(self, specs: list[JobSpec]) -> Client:
        """The client to submit ``specs`` with, once their model is served (else 404), they are
        within the job limits (else 400) and the queue has room for them (else 429)."""
        client = self.client()
        model = specs[0].model
        served = await self.models()
        if model not in served:
            raise ApiError(404, f"the model {model!r} is not served here (served: {', '.join(served) or 'none'})",
                           param="model", code="model_not_found")
        for spec in specs:
            limits.check_job(spec, self.limits)  # LimitError: 400 (``errors.limit_exceeded``)
        await limits.check_queue_depth(client.bus.js, self.settings, len(specs))  # QueueFull: 429
        limit = self.settings.gateway_max_backlog
        if limit:
            backlog = await self.backlog()
            if backlog + len(specs) > limit:
                raise ApiError(429, f"the queue holds {backlog} tasks and takes at most {limit}: "
                               f"{len(specs)} more do not fit; retry later", code="queue_full")
        return client
