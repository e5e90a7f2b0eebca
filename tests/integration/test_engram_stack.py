"""Engram in the deployment: compose.yaml's engram_store service (profile "engram") run by the
embedded launcher with its plain ``python -m`` command (it builds its missing arena from
settings and reports health), and an encoder reading rows from it over NATS. The image
equals the one computed in-process with the arena mapped locally."""

from __future__ import annotations

import io
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from disagfusion.client import Client
from disagfusion.config import Settings
from disagfusion.launcher import Launcher
from disagfusion.models import load_stage_model
from disagfusion.protocol import STAGES, JobSpec

# A stack serving many models: `make test-stacks` runs it, not `make test` (docs in the Makefile).
pytestmark = pytest.mark.stacks


def in_process_image(models_dir: Path, arena: Path | None, spec: JobSpec) -> np.ndarray:
    tensors = {}
    for stage in STAGES:
        settings = Settings(models_dir=models_dir, engram_arena=str(arena) if arena and stage == "encode" else "")
        [tensors] = load_stage_model(spec.model, stage, settings).run([spec], [tensors])
    return tensors["image"].numpy()


@pytest.mark.slow
async def test_stack_with_engram_store_gives_the_in_process_image(
    tmp_path: Path, tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models_dir = tiny_models_dir
    arena = Path("/dev/shm") / f"df-engram-test-{uuid.uuid4().hex}.arena"
    scratch = Path("/dev/shm") / f"df-engram-test-scratch-{uuid.uuid4().hex}"
    for key, value in {
        "COMPOSE_PROFILES": "engram",
        "DF_ENGRAM_ARENAS": str(arena),
        "DF_ENGRAM_SCRATCH_DIR": str(scratch),
        "DF_ENGRAM_ARENA": f"nats:{arena.stem}",
        "DF_MODELS": "tiny",
    }.items():
        monkeypatch.setenv(key, value)
    spec = JobSpec(prompt="a lighthouse at dusk", seed=3, steps=3, height=64, width=64, guidance=4.5)
    launcher = Launcher(tmp_path / "stack", models_dir=models_dir)
    assert "engram_store" in launcher.services
    try:
        launcher.up()  # waits until every service, engram_store included, reports health
        assert arena.exists()  # built by engram_store from DF_ENGRAM_SPEC's defaults
        async with Client(launcher.client_settings()) as client:
            [result] = [r async for r in client.run_many([spec], timeout=120)]
            assert result.status == "ok", result.error
            served = np.asarray(Image.open(io.BytesIO(await client.output(result))))
        expected = in_process_image(models_dir, arena, spec)
        plain = in_process_image(models_dir, None, spec)
    finally:
        launcher.down(timeout=20)
        arena.unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
    assert np.array_equal(served, expected)
    assert not np.array_equal(served, plain)
