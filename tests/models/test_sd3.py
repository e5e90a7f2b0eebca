"""The split SD3 stages against the stock StableDiffusion3Pipeline, on the sd3-tiny preset."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from disagfusion.config import Settings
from disagfusion.models import check_spec, load_stage_model, model_directory
from disagfusion.models.base import SpecError, StageModel
from disagfusion.models.sd3 import FAMILY, init_model
from disagfusion.protocol import STAGES, JobSpec
from tests.models.split import generate, handoff

MODEL = "sd3-tiny"


@pytest.fixture(scope="module")
def directory(tiny_models_dir: Path) -> Path:
    return model_directory(MODEL, Settings(models_dir=tiny_models_dir))


@pytest.fixture(scope="module")
def stages(tiny_models_dir: Path, directory: Path):
    @cache
    def load(dtype: str) -> dict[str, StageModel]:
        settings = Settings(models_dir=tiny_models_dir, dtype=dtype)
        return {stage: load_stage_model(MODEL, stage, settings) for stage in STAGES}

    return load


@pytest.fixture(scope="module")
def stock_bfloat16(directory: Path) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(directory, dtype=torch.bfloat16)
    # What from_pretrained does when accelerate is installed; without it diffusers 0.42 leaves
    # this DiT in float32 and the stock bfloat16 pipeline fails (see SD3Family.prepare).
    pipe.transformer.to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    ("height", "width", "guidance", "dtype"),
    [
        (64, 64, 4.5, "float32"),
        (64, 96, 1.0, "float32"),
        (96, 64, 7.0, "float32"),
        (64, 64, 1.0, "float32"),
        (256, 32, 4.5, "float32"),  # the largest side its position embeddings allow
        (64, 96, 4.5, "bfloat16"),
    ],
)
def test_split_run_is_pixel_identical_to_the_stock_pipeline(stages, stock_image, stock_bfloat16, height, width, guidance, dtype) -> None:
    spec = JobSpec(
        model=MODEL, prompt="A Lighthouse at dusk", negative_prompt="blurry", seed=7, steps=3,
        height=height, width=width, guidance=guidance,
    )
    [image] = generate(stages(dtype), [spec])
    assert image.dtype == np.uint8 and image.shape == (height, width, 3)
    if dtype == "bfloat16":
        expected = np.array(FAMILY.stock_call(stock_bfloat16, spec).images[0])
    else:
        expected = stock_image(spec, dtype)
    np.testing.assert_array_equal(image, expected)


def test_seed_prompt_and_guidance_change_the_image(stages) -> None:
    base = JobSpec(model=MODEL, prompt="a red cat", seed=3, steps=2, height=64, width=64, guidance=4.5)
    [reference] = generate(stages("float32"), [base])
    for change in [{"seed": 4}, {"prompt": "a blue dog"}, {"negative_prompt": "blurry"}, {"guidance": 1.0}]:
        [changed] = generate(stages("float32"), [base.model_copy(update=change)])
        assert not np.array_equal(changed, reference), change


def test_each_stage_holds_only_its_own_components(stages, directory: Path) -> None:
    reference = StableDiffusion3Pipeline.from_pretrained(directory).components
    for name, stage in stages("float32").items():
        own = FAMILY.stage_components[name]
        assert stage.loaded_components() == sorted(own)
        assert all(module is None for key, module in stage.pipe.components.items() if key not in own)
        modules = [module for module in stage.pipe.components.values() if isinstance(module, torch.nn.Module)]
        resident = sum(p.numel() for module in modules for p in module.parameters())
        expected = sum(p.numel() for key in own if isinstance(reference[key], torch.nn.Module) for p in reference[key].parameters())
        assert resident == expected > 0


def test_encoder_hands_on_exactly_the_declared_tensors(stages) -> None:
    specs = [JobSpec(model=MODEL, prompt="short", guidance=1.0), JobSpec(model=MODEL, prompt="a longer prompt " * 10, guidance=4.5)]
    unguided, guided = stages("float32")["encode"].run(specs, [{}, {}])
    assert set(unguided) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert set(guided) == set(FAMILY.handoff["encode"])
    for tensors in (unguided, guided):
        assert all(t.shape[0] == 1 for t in tensors.values())
    # Both CLIPs (77 tokens each, side by side) then T5 (256 tokens), at the T5 width.
    assert guided["prompt_embeds"].shape == guided["negative_prompt_embeds"].shape == (1, 77 + 256, 48)
    assert guided["pooled_prompt_embeds"].shape == (1, 16 + 24)


def test_encoder_batch_mixing_guidance_matches_each_alone(stages) -> None:
    specs = [JobSpec(model=MODEL, prompt="a cat", guidance=1.0), JobSpec(model=MODEL, prompt="dogs", negative_prompt="ugly", guidance=4.5)]
    encoder = stages("float32")["encode"]
    for spec, together in zip(specs, encoder.run(specs, [{}, {}])):
        [alone] = encoder.run([spec], [{}])
        assert together.keys() == alone.keys()
        for name in alone:
            torch.testing.assert_close(together[name], alone[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_batched_jobs_match_running_each_alone(stages, guidance) -> None:
    """Measured in float32 with 3 jobs: latents within 2.2e-6 of each alone, pixels within 1/255
    (batched matmuls round differently). In bfloat16 unguided jobs move by one ulp (1/64 at
    latent values near 4) and this random tiny VAE turns that into up to 14/255."""
    specs = [
        JobSpec(model=MODEL, prompt=prompt, negative_prompt=negative, seed=seed, steps=3, height=64, width=96, guidance=guidance)
        for prompt, negative, seed in [("a cat", "", 1), ("two dogs on a beach at noon", "ugly", 2), ("x", "", 3)]
    ]
    encoded = [handoff(t) for t in stages("float32")["encode"].run(specs, [{} for _ in specs])]
    denoiser = stages("float32")["denoise"]
    together = denoiser.run(specs, encoded)
    for spec, job, inputs in zip(specs, together, encoded):
        [alone] = denoiser.run([spec], [inputs])
        torch.testing.assert_close(job["latents"], alone["latents"], rtol=0, atol=1e-5)
    batched = generate(stages("float32"), specs)
    alone = [generate(stages("float32"), [spec])[0] for spec in specs]
    worst = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(batched, alone))
    print(f"batched vs alone: max difference {worst}/255")
    assert worst <= 1
    assert not np.array_equal(batched[0], batched[2])  # the jobs did not get one another's images


def test_denoiser_reports_every_step(stages) -> None:
    spec = JobSpec(model=MODEL, prompt="a cat", steps=4, height=64, width=64)
    encoded = stages("float32")["encode"].run([spec], [{}])
    steps: list[tuple[int, int]] = []
    [latents] = stages("float32")["denoise"].run([spec], encoded, lambda k, n: steps.append((k, n)))
    assert steps == [(k, 4) for k in range(1, 5)]
    assert set(latents) == {"latents"} and latents["latents"].shape == (1, 16, 8, 8)


@pytest.mark.parametrize(
    ("update", "field"),
    [({"frames": 2}, "frames"), ({"height": 56}, "height"), ({"width": 100}, "width"), ({"width": 272}, "width")],
)
def test_check_names_the_field(stages, tiny_models_dir: Path, update: dict, field: str) -> None:
    spec = JobSpec(model=MODEL, prompt="a cat", height=64, width=64).model_copy(update=update)
    for stage in stages("float32").values():
        with pytest.raises(SpecError) as error:
            stage.check(spec)
        assert error.value.field == field
    with pytest.raises(SpecError) as error:
        check_spec(spec, Settings(models_dir=tiny_models_dir))
    assert error.value.field == field


def test_geometry_comes_from_the_configs(directory: Path) -> None:
    geometry = FAMILY.geometry(directory)
    # The VAE scales by 8 and the DiT patch is 2; 16 position embeddings a side.
    assert (geometry.vae_scale_factor, geometry.size_multiple, geometry.max_size) == (8, 16, 256)
    assert (geometry.max_sequence_length, geometry.guidance) == (256, "cfg")
    geometry.check(JobSpec(prompt="p", height=256, width=16))


def test_preset_is_the_same_bytes_when_built_again(directory: Path, tmp_path: Path) -> None:
    def file_bytes(root: Path) -> dict[str, bytes]:
        return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}

    assert file_bytes(init_model(MODEL, tmp_path / MODEL)) == file_bytes(directory)
