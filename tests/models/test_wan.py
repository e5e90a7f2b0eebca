"""What only Wan 2.1 does, on the wan-tiny preset; what it shares with the other video families
(bitwise equal to the stock WanPipeline, stages, encoder, batching, spec checks) is tested in
test_video_family.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from disagfusion.config import Settings
from disagfusion.models import load_stage_model, model_directory
from disagfusion.models.wan import FAMILY
from disagfusion.protocol import JobSpec

MODEL = "wan-tiny"


@pytest.fixture(scope="module")
def directory(tiny_models_dir: Path) -> Path:
    return model_directory(MODEL, Settings(models_dir=tiny_models_dir))


def job(**update) -> JobSpec:
    base = JobSpec(model=MODEL, prompt="A lighthouse at dusk, waves rolling in", negative_prompt="blurry", seed=7,
                   steps=2, height=32, width=32, frames=5, guidance=1.0)
    return base.model_copy(update=update)


def test_encoder_pads_with_zeros(tiny_models_dir: Path) -> None:
    """512 UMT5 tokens (the stock call's default): a short prompt's are zero-padded."""
    encoder = load_stage_model(MODEL, "encode", Settings(models_dir=tiny_models_dir))
    [unguided] = encoder.run([job(prompt="short")], [{}])
    assert unguided["prompt_embeds"].shape == (1, 512, 32)
    assert not unguided["prompt_embeds"][0, -1].any()


def test_geometry_comes_from_the_configs(directory: Path) -> None:
    geometry = FAMILY.geometry(directory)
    # 8× VAE and 2×2 patches; frames 4k + 1.
    assert (geometry.vae_scale_factor, geometry.size_multiple, geometry.temporal_factor) == (8, 16, 4)
    assert (geometry.max_sequence_length, geometry.guidance) == (512, "cfg")
    for frames in (1, 5, 9, 81):
        geometry.check(job(frames=frames))
