"""The split FLUX.1 stages against the stock FluxPipeline, on the flux-tiny preset."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from disagfusion.config import Settings
from disagfusion.models import check_spec, load_stage_model, model_directory
from disagfusion.models.base import SpecError, StageModel
from disagfusion.models.flux import FAMILY, init_model
from disagfusion.protocol import STAGES, JobSpec
from tests.models.split import generate, handoff

MODEL = "flux-tiny"


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


def job(**update) -> JobSpec:
    base = JobSpec(model=MODEL, prompt="A Lighthouse at dusk", negative_prompt="blurry", seed=7, steps=2,
                   height=64, width=64, guidance=1.0, embedded_guidance=3.5)
    return base.model_copy(update=update)


@pytest.mark.parametrize(
    ("height", "width", "guidance", "dtype"),
    [
        (64, 64, 1.0, "float32"),
        (64, 96, 1.0, "float32"),
        (96, 64, 4.5, "float32"),
        (64, 64, 4.5, "float32"),
        (64, 96, 4.5, "bfloat16"),
    ],
)
def test_split_run_is_pixel_identical_to_the_stock_pipeline(stages, stock_image, height, width, guidance, dtype) -> None:
    spec = job(height=height, width=width, guidance=guidance)
    [image] = generate(stages(dtype), [spec])
    assert image.dtype == np.uint8 and image.shape == (height, width, 3)
    np.testing.assert_array_equal(image, stock_image(spec, dtype))


def test_true_cfg_and_embedded_guidance_each_match_the_stock_pipeline_and_differ(stages, stock_image) -> None:
    images = {}
    for case, spec in {
        "plain": job(),
        "true cfg": job(guidance=4.0, negative_prompt="fog and rain"),
        "embedded guidance": job(embedded_guidance=7.0),
    }.items():
        [images[case]] = generate(stages("float32"), [spec])
        np.testing.assert_array_equal(images[case], stock_image(spec), err_msg=case)
    assert not np.array_equal(images["true cfg"], images["embedded guidance"])
    assert not np.array_equal(images["true cfg"], images["plain"])
    assert not np.array_equal(images["embedded guidance"], images["plain"])


def test_negative_prompt_counts_only_with_guidance(stages) -> None:
    [unguided, other_negative] = [generate(stages("float32"), [job(negative_prompt=n)])[0] for n in ("blurry", "dark")]
    np.testing.assert_array_equal(unguided, other_negative)
    [guided, guided_other] = [generate(stages("float32"), [job(guidance=3.0, negative_prompt=n)])[0] for n in ("blurry", "dark")]
    assert not np.array_equal(guided, guided_other)


def test_each_stage_holds_only_its_own_components(stages, directory: Path) -> None:
    reference = FluxPipeline.from_pretrained(directory).components
    for name, stage in stages("float32").items():
        own = FAMILY.stage_components[name]
        assert stage.loaded_components() == sorted(own)
        assert all(module is None for key, module in stage.pipe.components.items() if key not in own)
        modules = [module for module in stage.pipe.components.values() if isinstance(module, torch.nn.Module)]
        resident = sum(p.numel() for module in modules for p in module.parameters())
        expected = sum(p.numel() for key in own if isinstance(reference[key], torch.nn.Module) for p in reference[key].parameters())
        assert resident == expected > 0


def test_encoder_hands_on_exactly_the_declared_tensors(stages) -> None:
    specs = [job(prompt="short"), job(prompt="a longer prompt " * 10, guidance=4.5), job(prompt="x", guidance=2.0)]
    unguided, guided, guided_too = stages("float32")["encode"].run(specs, [{}, {}, {}])
    assert set(unguided) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert set(guided) == set(guided_too) == set(FAMILY.handoff["encode"])
    for tensors in (unguided, guided, guided_too):
        assert all(t.shape[0] == 1 for t in tensors.values())
    assert guided["prompt_embeds"].shape == guided["negative_prompt_embeds"].shape == (1, 512, 32)  # T5
    assert guided["pooled_prompt_embeds"].shape == (1, 16)  # CLIP's pooled output


def test_encoder_batch_mixing_guidance_matches_each_alone(stages) -> None:
    specs = [job(prompt="a cat"), job(prompt="dogs", negative_prompt="ugly", guidance=4.5)]
    encoder = stages("float32")["encode"]
    for spec, together in zip(specs, encoder.run(specs, [{}, {}])):
        [alone] = encoder.run([spec], [{}])
        assert together.keys() == alone.keys()
        for name in alone:
            torch.testing.assert_close(together[name], alone[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_batched_jobs_match_running_each_alone(stages, guidance) -> None:
    """Measured in float32 with 3 jobs: latents within 1.8e-6 of each alone, pixels within 1/255
    (batched matmuls round differently); in bfloat16 they were equal."""
    specs = [
        job(prompt=prompt, negative_prompt=negative, seed=seed, steps=3, width=96, guidance=guidance)
        for prompt, negative, seed in [("a cat", "", 1), ("two dogs on a beach at noon", "ugly", 2), ("x", "", 3)]
    ]
    encoded = [handoff(t) for t in stages("float32")["encode"].run(specs, [{} for _ in specs])]
    denoiser = stages("float32")["denoise"]
    together = denoiser.run(specs, encoded)
    for spec, latents, inputs in zip(specs, together, encoded):
        [alone] = denoiser.run([spec], [inputs])
        torch.testing.assert_close(latents["latents"], alone["latents"], rtol=0, atol=1e-5)
    batched = generate(stages("float32"), specs)
    alone = [generate(stages("float32"), [spec])[0] for spec in specs]
    worst = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(batched, alone))
    print(f"batched vs alone: max difference {worst}/255")
    assert worst <= 1
    assert not np.array_equal(batched[0], batched[2])  # the jobs did not get one another's images


def test_denoiser_reports_every_step_and_hands_on_packed_latents(stages) -> None:
    spec = job(steps=4, width=96)
    encoded = stages("float32")["encode"].run([spec], [{}])
    steps: list[tuple[int, int]] = []
    [latents] = stages("float32")["denoise"].run([spec], encoded, lambda k, n: steps.append((k, n)))
    assert steps == [(k, 4) for k in range(1, 5)]
    # 8×12 latents in 2×2 patches of 16 channels.
    assert set(latents) == {"latents"} and latents["latents"].shape == (1, 4 * 6, 64)


@pytest.mark.parametrize(
    ("update", "field"), [({"frames": 2}, "frames"), ({"height": 56}, "height"), ({"width": 100}, "width")],
)
def test_check_names_the_field(stages, tiny_models_dir: Path, update: dict, field: str) -> None:
    spec = job(**update)
    for stage in stages("float32").values():
        with pytest.raises(SpecError) as error:
            stage.check(spec)
        assert error.value.field == field
    with pytest.raises(SpecError) as error:
        check_spec(spec, Settings(models_dir=tiny_models_dir))
    assert error.value.field == field


def test_geometry_comes_from_the_configs(directory: Path) -> None:
    geometry = FAMILY.geometry(directory)
    # The VAE scales by 8, and latents are packed in 2×2 patches.
    assert (geometry.vae_scale_factor, geometry.size_multiple) == (8, 16)
    assert (geometry.max_sequence_length, geometry.guidance) == (512, "embedded")


def test_preset_is_the_same_bytes_when_built_again(directory: Path, tmp_path: Path) -> None:
    def file_bytes(root: Path) -> dict[str, bytes]:
        return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}

    assert file_bytes(init_model(MODEL, tmp_path / MODEL)) == file_bytes(directory)
