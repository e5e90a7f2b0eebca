"""What only LTX-Video does, on the ltx-tiny preset (whose VAE is timestep-conditioned, as
LTX-Video 0.9.1+: the decoder replays the stock call's decode noise); what it shares with the
other video families (bitwise equal to the stock LTXPipeline, stages, encoder, batching, spec
checks) is tested in test_video_family.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from disagfusion.config import Settings
from disagfusion.models import ltx, model_directory
from disagfusion.models.ltx import FAMILY
from disagfusion.protocol import JobSpec
from tests.models.split import frames

MODEL = "ltx-tiny"


@pytest.fixture(scope="module")
def directory(tiny_models_dir: Path) -> Path:
    return model_directory(MODEL, Settings(models_dir=tiny_models_dir))


def job(**update) -> JobSpec:
    base = JobSpec(model=MODEL, prompt="A lighthouse at dusk, waves rolling in", negative_prompt="blurry", seed=7,
                   steps=2, height=32, width=32, frames=5, guidance=1.0)
    return base.model_copy(update=update)


def test_encoder_hands_on_a_boolean_attention_mask(stages) -> None:
    """128 T5 tokens (the stock call's default), long prompts truncated, short ones masked."""
    specs = [job(prompt="short"), job(prompt="a longer prompt " * 200, guidance=5.0)]
    unguided, guided = stages(MODEL)["encode"].run(specs, [{}, {}])
    assert guided["prompt_attention_mask"].dtype == torch.bool and guided["prompt_attention_mask"].all()
    assert unguided["prompt_attention_mask"].shape == (1, 128) and not unguided["prompt_attention_mask"][0, -1]


def test_geometry_comes_from_the_configs(directory: Path) -> None:
    geometry = FAMILY.geometry(directory)
    # 4× VAE, but the pipeline asks for multiples of 32; frames 4k + 1 (4× in time).
    assert (geometry.vae_scale_factor, geometry.size_multiple, geometry.temporal_factor) == (4, 32, 4)
    assert (geometry.max_sequence_length, geometry.guidance, geometry.fps) == (128, "cfg", 25)
    for count in (1, 5, 9, 121):
        geometry.check(job(frames=count))


def test_decoder_replays_the_stock_calls_decode_noise(stages, stock_frames, monkeypatch) -> None:
    """The VAE is timestep-conditioned: the stock call mixes in noise from the job's generator,
    drawn after the initial latents. The decoder replays it; other noise gives other frames."""
    split = stages(MODEL)
    assert split["decode"].pipe.vae.config.timestep_conditioning
    spec = job(guidance=5.0)
    replayed = frames(split, spec)
    np.testing.assert_array_equal(replayed, stock_frames(spec))
    monkeypatch.setattr(ltx, "_decode_noise", lambda seed, shape, dtype: torch.zeros((1, *shape), dtype=dtype))
    assert not np.array_equal(frames(split, spec), replayed)
