"""What is PixArt's own, on the tiny preset: bfloat16 runs, attention masks, its geometry, and how
a PixArt directory that cannot load is reported. What every family shares is in test_family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from disagfusion.config import Settings
from disagfusion.models import check_spec, load_stage_model
from disagfusion.models.base import SpecError
from disagfusion.models.pixart import FAMILY
from disagfusion.protocol import STAGES, JobSpec
from tests.models.split import assert_batch_like_each_alone, assert_stock_image


@pytest.mark.parametrize(
    ("height", "width", "guidance", "dtype"),
    [
        (128, 64, 7.0, "float32"),
        (64, 64, 1.0, "bfloat16"),
        (96, 128, 4.5, "bfloat16"),
    ],
)
def test_split_run_is_pixel_identical_to_the_stock_pipeline(stages, stock_image, height, width, guidance, dtype) -> None:
    """bfloat16 and a tall size with strong guidance; float32 at other sizes is in test_family."""
    spec = JobSpec(prompt="A Lighthouse at dusk", negative_prompt="blurry", seed=7, steps=6, height=height, width=width, guidance=guidance)
    assert_stock_image(stages("tiny", dtype), spec, stock_image(spec, dtype))


def test_attention_masks_count_each_prompt_s_tokens(stages) -> None:
    specs = [JobSpec(prompt="short", guidance=1.0), JobSpec(prompt="a much longer prompt " * 30, guidance=4.5)]
    unguided, guided = stages("tiny")["encode"].run(specs, [{}, {}])
    assert guided["prompt_embeds"].shape == guided["negative_prompt_embeds"].shape
    assert unguided["prompt_attention_mask"].sum() < guided["prompt_attention_mask"].sum()


def test_batched_jobs_match_running_each_alone_in_bfloat16(stages) -> None:
    """float32 is in test_family; in bfloat16 PixArt keeps within 1/255 too."""
    specs = [
        JobSpec(prompt=prompt, negative_prompt=negative, seed=seed, steps=5, height=64, width=96, guidance=4.5)
        for prompt, negative, seed in [("a cat", "", 1), ("two dogs on a beach at noon", "ugly", 2), ("x", "", 3)]
    ]
    assert_batch_like_each_alone(stages("tiny", "bfloat16"), specs, "pixart bfloat16")


def test_size_multiple_comes_from_the_configs(tiny_dir: Path) -> None:
    geometry = FAMILY.geometry(tiny_dir)
    assert (geometry.vae_scale_factor, geometry.size_multiple) == (4, 8)  # the tiny VAE scales by 4, not 8
    sdxl_vae = geometry.model_copy(update={"vae_scale_factor": 8, "size_multiple": 16})
    sdxl_vae.check(JobSpec(prompt="p", height=1024, width=768))
    with pytest.raises(SpecError, match="multiple of 16") as error:
        sdxl_vae.check(JobSpec(prompt="p", height=1024, width=776))
    assert error.value.field == "width"


def test_check_spec_needs_only_the_configs(tiny_dir: Path, tmp_path: Path) -> None:
    for config in tiny_dir.rglob("*.json"):  # a copy without any weights
        target = tmp_path / "configs_only" / config.relative_to(tiny_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(config.read_bytes())
    settings = Settings(models_dir=tmp_path)
    check_spec(JobSpec(model="configs_only", prompt="a cat", height=64, width=128), settings)
    with pytest.raises(SpecError, match="height"):
        check_spec(JobSpec(model="configs_only", prompt="a cat", height=68), settings)


def test_unknown_model_names_the_directory_and_presets(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as error:
        load_stage_model("nope", "encode", Settings(models_dir=tmp_path))
    assert error.value.field == "model"
    assert str(tmp_path / "nope") in str(error.value) and "tiny" in str(error.value)


def test_unsupported_pipeline_class_is_a_spec_error(tmp_path: Path) -> None:
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(SpecError, match="StableDiffusionPipeline") as error:
        check_spec(JobSpec(model="sd", prompt="a cat"), Settings(models_dir=tmp_path))
    assert error.value.field == "model"


def test_a_directory_missing_a_component_names_it_at_every_stage(tiny_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_dir, tmp_path / "no_vae", ignore=shutil.ignore_patterns("vae"))
    settings = Settings(models_dir=tmp_path)
    for stage in STAGES:
        with pytest.raises(SpecError, match=r"lacks vae/ \(loaded by decode\)") as error:
            load_stage_model("no_vae", stage, settings)
        assert error.value.field == "model"
    with pytest.raises(SpecError, match="lacks vae/"):
        check_spec(JobSpec(model="no_vae", prompt="a cat", height=64, width=64), settings)


def test_unreadable_weights_are_a_spec_error_naming_the_stage(tiny_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_dir, tmp_path / "broken")
    (tmp_path / "broken" / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    settings = Settings(models_dir=tmp_path)
    load_stage_model("broken", "encode", settings)  # the encoder does not read the transformer's weights
    with pytest.raises(SpecError, match="cannot load the denoise stage of pixart model") as error:
        load_stage_model("broken", "denoise", settings)
    assert error.value.field == "model"
