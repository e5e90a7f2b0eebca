"""In-process stage workers for the worker tests, started against the real servers of
``tests/conftest.py`` and stopped (drained) after each test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from disagfusion.config import Settings
from disagfusion.models.base import StageModel
from disagfusion.worker.stage_worker import StageWorker

StartDenoiseWorker = Callable[[StageModel, Settings], StageWorker]
Worker = Callable[..., Awaitable[StageModel]]


@pytest.fixture
async def start_denoise_worker() -> AsyncIterator[StartDenoiseWorker]:
    """Start a denoise worker serving ``model`` with ``settings``, running until the test ends."""
    running: list[tuple[StageWorker, asyncio.Task]] = []

    def start(model: StageModel, settings: Settings) -> StageWorker:
        worker = StageWorker("denoise", settings, load_model=lambda name, stage, s: model)
        running.append((worker, asyncio.create_task(worker.run())))
        return worker

    yield start
    for worker, task in running:
        worker.stop()
        await asyncio.wait_for(task, 30)


@pytest.fixture
def run_worker(start_denoise_worker: StartDenoiseWorker, nats_server: str, tmp_path: Path) -> Worker:
    """Start a denoise worker serving ``model`` as model ``m`` (shm handoffs), with more settings."""

    async def start(model: StageModel, **settings) -> StageModel:
        start_denoise_worker(model, Settings(nats_url=nats_server, models="m", shm_dir=tmp_path / "shm", **settings))
        return model

    return start
