"""The pixart family's Engram option, at the image: a job's pixels are identical whether the
text encoder's Engram rows come from the local arena mapping, from a real engram_store process
over NATS, or from in-process embeddings with the same weights, and Engram does change them."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from disagfusion.config import Settings
from disagfusion.engram.arena import Arena, LookupRequestError
from disagfusion.engram.build import build, from_spec
from disagfusion.engram.client import EngramClient
from disagfusion.engram.module import EmbeddingRows
from disagfusion.engram.spec import EngramArenaSpec
from disagfusion.models import load_stage_model
from disagfusion.models.base import StageModel
from disagfusion.models.pixart import FAMILY
from disagfusion.protocol import JobSpec
from tests.engram.conftest import SHM, new_arena_path, start_engram_store, stop_engram_store
from tests.models.split import handoff

# Rows of unit scale, so that they (not only the Engram layers' biases) move the pixels.
SPEC = EngramArenaSpec(scale=1.0)
JOBS = [
    JobSpec(prompt="a lighthouse at dusk", negative_prompt="blurry", seed=5, steps=3, height=64, width=64, guidance=4.5),
    JobSpec(prompt="two red foxes", seed=6, steps=3, height=64, width=64, guidance=1.0),
]


def built_arena(spec: EngramArenaSpec) -> str:
    path = str(new_arena_path())
    build(path, *from_spec(spec))
    return path


@pytest.fixture(scope="module")
def arena_path() -> Iterator[str]:
    path = built_arena(SPEC)
    yield path
    Path(path).unlink()


@pytest.fixture(scope="module")
def later_stages(tiny_models_dir: Path) -> dict[str, StageModel]:
    settings = Settings(models_dir=tiny_models_dir)
    return {stage: load_stage_model("tiny", stage, settings) for stage in ("denoise", "decode")}


def images(encoder: StageModel, later_stages: dict[str, StageModel]) -> list[np.ndarray]:
    """Both prompts in one encoder batch; then each job alone (their shapes differ)."""
    out = []
    for job, tensors in zip(JOBS, encoder.run(JOBS, [{} for _ in JOBS]), strict=True):
        tensors = handoff(tensors)
        for stage in ("denoise", "decode"):
            [tensors] = later_stages[stage].run([job], [tensors])
            tensors = handoff(tensors)
        out.append(tensors["image"].numpy())
    return out


def engram_images(settings: Settings, later_stages: dict[str, StageModel]) -> list[np.ndarray]:
    encoder = load_stage_model("tiny", "encode", settings)
    assert encoder.pipe.engram is not None
    try:
        return images(encoder, later_stages)
    finally:
        encoder.pipe.engram.client.close()


def test_images_are_identical_across_row_sources(tiny_models_dir: Path, arena_path: str, later_stages, nats_server: str) -> None:
    local = Settings(models_dir=tiny_models_dir, engram_arena=arena_path)
    from_mapping = engram_images(local, later_stages)

    # The same encoder with its rows from in-process tensors holding the arena's bytes.
    encoder = load_stage_model("tiny", "encode", local)
    encoder.pipe.engram.client.close()
    with Arena.open(arena_path) as arena:
        tables = {info.name: torch.from_numpy(arena.table(info.name).copy()) for info in arena.directory.tables}
        encoder.pipe.engram.client = EngramClient(EmbeddingRows(tables, arena.directory))
    from_embedding = images(encoder, later_stages)
    encoder.pipe.engram.client.close()

    scratch = SHM / f"df-engram-test-scratch-{uuid.uuid4().hex}"
    proc = start_engram_store(nats_server, [arena_path], str(scratch))
    try:
        from_service = {
            reply: engram_images(
                Settings(models_dir=tiny_models_dir, engram_arena=f"nats:{Path(arena_path).stem}", nats_url=nats_server, engram_reply=reply),
                later_stages,
            )
            for reply in ("shm", "chunks")
        }
    finally:
        stop_engram_store(proc)
        shutil.rmtree(scratch, ignore_errors=True)

    for image in from_mapping:
        assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    for other in (from_embedding, from_service["shm"], from_service["chunks"]):
        for a, b in zip(from_mapping, other, strict=True):
            assert np.array_equal(a, b)

    # Engram changes the picture, and so do its rows alone (same hashes, same layer weights).
    plain = images(load_stage_model("tiny", "encode", Settings(models_dir=tiny_models_dir)), later_stages)
    other_rows = built_arena(SPEC.model_copy(update={"scale": 2.0}))
    try:
        rescaled = engram_images(Settings(models_dir=tiny_models_dir, engram_arena=other_rows), later_stages)
    finally:
        Path(other_rows).unlink()
    for with_engram, without, with_other_rows in zip(from_mapping, plain, rescaled, strict=True):
        assert not np.array_equal(with_engram, without)
        assert not np.array_equal(with_engram, with_other_rows)


def test_engram_blocks_beyond_the_encoder_are_refused(tiny_models_dir: Path, arena_path: str) -> None:
    settings = Settings(models_dir=tiny_models_dir, engram_arena=arena_path, engram_blocks="0:3")
    with pytest.raises(LookupRequestError, match=r"blocks \{0: 3\}; this encoder has 1 blocks"):
        FAMILY.load_stage(tiny_models_dir / "tiny", "encode", settings)
