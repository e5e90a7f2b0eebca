"""What only CogVideoX does, on the cogvideox-tiny preset: its frame rule (8k + 1), its text
length, and a sharded fp16 checkpoint; what it shares with the other video families (bitwise
equal to the stock CogVideoXPipeline, stages, encoder, batching, spec checks) is tested in
test_video_family.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline

from disagfusion.config import Settings
from disagfusion.models import load_stage_model, model_directory
from disagfusion.models.cogvideox import FAMILY
from disagfusion.protocol import STAGES, JobSpec
from tests.models.split import frames

MODEL = "cogvideox-tiny"


@pytest.fixture(scope="module")
def directory(tiny_models_dir: Path) -> Path:
    return model_directory(MODEL, Settings(models_dir=tiny_models_dir))


def job(**update) -> JobSpec:
    base = JobSpec(model=MODEL, prompt="A lighthouse at dusk, waves rolling in", negative_prompt="blurry", seed=7,
                   steps=2, height=32, width=32, frames=9, guidance=1.0)
    return base.model_copy(update=update)


def test_geometry_comes_from_the_configs(directory: Path) -> None:
    geometry = FAMILY.geometry(directory)
    # 8× VAE and 2×2 patches; frames 8k + 1 (4× time, latent frames decoded in pairs).
    assert (geometry.vae_scale_factor, geometry.size_multiple, geometry.temporal_factor) == (8, 16, 8)
    # The transformer's max_text_seq_length (226) T5 tokens.
    assert (geometry.max_sequence_length, geometry.guidance) == (226, "cfg")
    for count in (1, 9, 17, 49):
        geometry.check(job(frames=count))


def test_a_sharded_fp16_variant_loads_per_stage(directory: Path, tmp_path: Path) -> None:
    """As real checkpoints are saved: fp16 weights as the ``fp16`` variant, in shards, and a
    model_index.json naming the fast tokenizer class."""
    checkpoint = tmp_path / MODEL
    CogVideoXPipeline.from_pretrained(directory).to(torch.float16).save_pretrained(
        checkpoint, variant="fp16", max_shard_size="20KB"
    )
    index = json.loads((checkpoint / "model_index.json").read_text())
    index["tokenizer"][1] = "T5TokenizerFast"
    (checkpoint / "model_index.json").write_text(json.dumps(index))
    assert list(checkpoint.glob("*/*.fp16-0000*-of-*.safetensors"))
    settings = Settings(models_dir=tmp_path, variant="fp16")
    spec = job(guidance=6.0)
    video = frames({stage: load_stage_model(MODEL, stage, settings) for stage in STAGES}, spec)
    stock = CogVideoXPipeline.from_pretrained(checkpoint, variant="fp16", dtype=torch.float32)
    stock.set_progress_bar_config(disable=True)
    expected = np.stack([np.array(frame) for frame in FAMILY.stock_call(stock, spec).frames[0]])
    np.testing.assert_array_equal(video, expected)
