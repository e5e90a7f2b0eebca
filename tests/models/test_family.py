"""What every diffusers family shares: a checkpoint saved the way real ones are (sharded, with an
fp16 variant) loads per stage, each stage holds only its own components, and the per-stage
weight bytes are those files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from disagfusion.config import Settings
from disagfusion.models import load_stage_model, model_directory, model_family, weight_bytes
from disagfusion.models.family import DiffusersFamily, DiffusersStage
from disagfusion.protocol import STAGES, JobSpec
from tests.models.split import generate

PRESETS = ["tiny", "sd3-tiny", "flux-tiny", "sana-tiny", "qwen-image-tiny"]
"""One preset per diffusers family."""

SPEC = JobSpec(prompt="a lighthouse at dusk", negative_prompt="blurry", seed=5, steps=2, height=64, width=64, guidance=4.5)


def stock_pipeline(directory: Path, **options) -> DiffusionPipeline:
    family = model_family(directory)
    pipe = family.pipeline_type().from_pretrained(directory, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def real_layout(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Each preset saved as real checkpoints are: fp16 weights as the ``fp16`` variant, in
    shards, and a model_index.json that names fast tokenizer classes."""

    def save(name: str) -> Path:
        directory = tmp_path_factory.mktemp("checkpoints") / name
        pipe = stock_pipeline(model_directory(name, Settings(models_dir=tiny_models_dir)))
        pipe.to(torch.float16).save_pretrained(directory, variant="fp16", max_shard_size="20KB")
        index = json.loads((directory / "model_index.json").read_text())
        for component, value in index.items():
            if component.startswith("tokenizer") and value[1] in ("T5Tokenizer", "CLIPTokenizer"):
                value[1] += "Fast"
        (directory / "model_index.json").write_text(json.dumps(index))
        return directory

    return save


@pytest.mark.parametrize("name", PRESETS)
def test_a_sharded_fp16_variant_loads_per_stage(real_layout, name: str) -> None:
    directory = real_layout(name)
    shards = list(directory.glob("*/*.fp16-0000*-of-*.safetensors"))
    assert shards, "the checkpoint was not sharded"
    assert all(".fp16" in path.name for path in directory.glob("*/*.safetensors")), "only fp16 files were written"
    settings = Settings(models_dir=directory.parent, variant="fp16")
    stages = {stage: load_stage_model(name, stage, settings) for stage in STAGES}
    [image] = generate(stages, [SPEC.model_copy(update={"model": name})])
    stock = stock_pipeline(directory, variant="fp16", dtype=torch.float32)
    family = model_family(directory)
    expected = np.array(family.stock_call(stock, SPEC).images[0])
    np.testing.assert_array_equal(image, expected)
    sizes = weight_bytes(name, settings)
    for stage in STAGES:
        files = [path for part in family.stage_components[stage] for path in (directory / part).glob("*.fp16*.safetensors")]
        assert sizes[stage] == sum(path.stat().st_size for path in files)
    assert sizes["denoise"] > 0 and sizes["decode"] > 0


@pytest.mark.parametrize("name", PRESETS)
def test_each_stage_holds_only_its_own_components(tiny_models_dir: Path, name: str) -> None:
    settings = Settings(models_dir=tiny_models_dir)
    directory = model_directory(name, settings)
    family = model_family(directory)
    assert isinstance(family, DiffusersFamily)
    for stage in STAGES:
        model = load_stage_model(name, stage, settings)
        assert isinstance(model, DiffusersStage)
        assert model.loaded_components() == sorted(family.stage_components[stage])
        modules = [m for m in model.pipe.components.values() if isinstance(m, torch.nn.Module)]
        on_disk = family.weight_bytes(directory)[stage]
        resident = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
        # Resident fp32 parameters are the stage's weight files, less their headers and
        # buffers; nothing of another stage's size is loaded.
        assert 0.9 * on_disk < resident <= on_disk, (stage, resident, on_disk)
