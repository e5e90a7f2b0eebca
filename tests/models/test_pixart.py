"""The split PixArt stages against the stock pipeline, on the tiny preset."""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from disagfusion.config import Settings
from disagfusion.models import check_spec, load_stage_model
from disagfusion.models.base import SpecError, StageModel
from disagfusion.models.pixart import FAMILY
from disagfusion.protocol import STAGES, JobSpec
from tests.models.split import generate


@pytest.fixture(scope="module")
def stages(tiny_models_dir: Path):
    @cache
    def load(dtype: str) -> dict[str, StageModel]:
        settings = Settings(models_dir=tiny_models_dir, dtype=dtype)
        return {stage: load_stage_model("tiny", stage, settings) for stage in STAGES}

    return load


@pytest.mark.parametrize(
    ("height", "width", "guidance", "dtype"),
    [
        (64, 64, 4.5, "float32"),
        (64, 128, 1.0, "float32"),
        (128, 64, 7.0, "float32"),
        (64, 64, 1.0, "bfloat16"),
        (96, 128, 4.5, "bfloat16"),
    ],
)
def test_split_run_is_pixel_identical_to_the_stock_pipeline(stages, stock_image, height, width, guidance, dtype) -> None:
    spec = JobSpec(
        prompt="A Lighthouse at dusk", negative_prompt="blurry", seed=7, steps=6,
        height=height, width=width, guidance=guidance,
    )
    [image] = generate(stages(dtype), [spec])
    assert image.dtype == np.uint8 and image.shape == (height, width, 3)
    np.testing.assert_array_equal(image, stock_image(spec, dtype))


def test_seed_prompt_and_guidance_change_the_image(stages) -> None:
    base = JobSpec(prompt="a red cat", seed=3, steps=4, height=64, width=64, guidance=4.5)
    [reference] = generate(stages("float32"), [base])
    for change in [{"seed": 4}, {"prompt": "a blue dog"}, {"negative_prompt": "blurry"}, {"guidance": 1.0}]:
        [changed] = generate(stages("float32"), [base.model_copy(update=change)])
        assert not np.array_equal(changed, reference), change


def test_encoder_outputs_negatives_only_with_guidance(stages) -> None:
    specs = [JobSpec(prompt="short", guidance=1.0), JobSpec(prompt="a much longer prompt " * 30, guidance=4.5)]
    unguided, guided = stages("float32")["encode"].run(specs, [{}, {}])
    assert set(unguided) == {"prompt_embeds", "prompt_attention_mask"}
    assert set(guided) == set(unguided) | {"negative_prompt_embeds", "negative_prompt_attention_mask"}
    assert guided["prompt_embeds"].shape == guided["negative_prompt_embeds"].shape
    assert unguided["prompt_attention_mask"].sum() < guided["prompt_attention_mask"].sum()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_jobs_match_running_each_alone(stages, dtype) -> None:
    specs = [
        JobSpec(prompt=prompt, negative_prompt=negative, seed=seed, steps=5, height=64, width=96, guidance=4.5)
        for prompt, negative, seed in [("a cat", "", 1), ("two dogs on a beach at noon", "ugly", 2), ("x", "", 3)]
    ]
    batched = generate(stages(dtype), specs)
    alone = [generate(stages(dtype), [spec])[0] for spec in specs]
    worst = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(batched, alone))
    print(f"batched vs alone, {dtype}: max difference {worst}/255")
    assert worst <= 1
    assert not np.array_equal(batched[0], batched[2])  # the jobs did not get one another's images


def test_encoder_batch_mixing_guidance_matches_each_alone(stages) -> None:
    specs = [JobSpec(prompt="a cat", guidance=1.0), JobSpec(prompt="a long prompt about dogs", guidance=4.5)]
    encoder = stages("float32")["encode"]
    batched = encoder.run(specs, [{}, {}])
    for spec, together in zip(specs, batched):
        [alone] = encoder.run([spec], [{}])
        assert together.keys() == alone.keys()
        for name in alone:
            torch.testing.assert_close(together[name], alone[name], rtol=0, atol=1e-5)


def test_denoiser_reports_every_step(stages) -> None:
    spec = JobSpec(prompt="a cat", steps=5, height=64, width=64)
    encoded = stages("float32")["encode"].run([spec], [{}])
    steps: list[tuple[int, int]] = []
    stages("float32")["denoise"].run([spec], encoded, lambda k, n: steps.append((k, n)))
    assert steps == [(k, 5) for k in range(1, 6)]


@pytest.mark.parametrize(
    ("update", "field"),
    [({"height": 60}, "height"), ({"width": 100}, "width"), ({"frames": 2}, "frames")],
)
def test_check_names_the_field(stages, tiny_models_dir: Path, update: dict, field: str) -> None:
    spec = JobSpec(prompt="a cat", height=64, width=64).model_copy(update=update)
    for stage in stages("float32").values():
        with pytest.raises(SpecError) as error:
            stage.check(spec)
        assert error.value.field == field
    with pytest.raises(SpecError) as error:
        check_spec(spec, Settings(models_dir=tiny_models_dir))
    assert error.value.field == field


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
