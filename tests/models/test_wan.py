"""The split Wan 2.1 stages against the stock WanPipeline, on the wan-tiny preset."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from disagfusion.config import Settings
from disagfusion.models import check_spec, load_stage_model, model_directory
from disagfusion.models.base import SpecError, StageModel
from disagfusion.models.wan import FAMILY, init_model
from disagfusion.protocol import STAGES, JobSpec
from tests.models.split import handoff

MODEL = "wan-tiny"


@pytest.fixture(scope="module")
def directory(tiny_models_dir: Path) -> Path:
    return model_directory(MODEL, Settings(models_dir=tiny_models_dir))


@pytest.fixture(scope="module")
def stages(tiny_models_dir: Path, directory: Path) -> dict[str, StageModel]:
    settings = Settings(models_dir=tiny_models_dir)
    return {stage: load_stage_model(MODEL, stage, settings) for stage in STAGES}


@pytest.fixture(scope="module")
def stock_video(directory: Path):
    """The frames the stock pipeline, loaded with ``from_pretrained``, makes for a spec in-process."""
    pipe = WanPipeline.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)

    @cache
    def video(spec: JobSpec) -> np.ndarray:
        return np.stack([np.array(frame) for frame in FAMILY.stock_call(pipe, spec).frames[0]])

    return video


def generate(stages: dict[str, StageModel], specs: list[JobSpec]) -> list[dict[str, np.ndarray]]:
    """The videos the split stages make for ``specs`` run as one batch, each tensor crossing a
    byte boundary between stages as through a transport."""
    tensors: list[dict] = [{} for _ in specs]
    for stage in STAGES:
        tensors = [handoff(t) for t in stages[stage].run(specs, tensors)]
    return [{name: t.numpy() for name, t in job.items()} for job in tensors]


def job(**update) -> JobSpec:
    base = JobSpec(model=MODEL, prompt="A lighthouse at dusk, waves rolling in", negative_prompt="blurry", seed=7,
                   steps=2, height=32, width=32, frames=5, guidance=1.0)
    return base.model_copy(update=update)


@pytest.mark.parametrize(
    ("height", "width", "frames", "guidance"),
    [(32, 32, 5, 1.0), (32, 32, 5, 5.0), (32, 48, 9, 1.0), (48, 32, 9, 5.0)],
)
def test_split_run_is_pixel_identical_to_the_stock_pipeline(stages, stock_video, height, width, frames, guidance) -> None:
    spec = job(height=height, width=width, frames=frames, guidance=guidance)
    [out] = generate(stages, [spec])
    assert out["video"].dtype == np.uint8 and out["video"].shape == (frames, height, width, 3)
    np.testing.assert_array_equal(out["video"], stock_video(spec))
    np.testing.assert_array_equal(out["image"], out["video"][0])


def test_negative_prompt_counts_only_with_guidance(stages) -> None:
    unguided, other = (generate(stages, [job(negative_prompt=n)])[0]["video"] for n in ("blurry", "dark"))
    np.testing.assert_array_equal(unguided, other)
    guided, guided_other = (generate(stages, [job(guidance=5.0, negative_prompt=n)])[0]["video"] for n in ("blurry", "dark"))
    assert not np.array_equal(guided, guided_other)


def test_each_stage_holds_only_its_own_components(stages, directory: Path) -> None:
    reference = WanPipeline.from_pretrained(directory).components
    for name, stage in stages.items():
        own = FAMILY.stage_components[name]
        assert stage.loaded_components() == sorted(own)
        assert all(module is None for key, module in stage.pipe.components.items() if key not in own)
        modules = [module for module in stage.pipe.components.values() if isinstance(module, torch.nn.Module)]
        resident = sum(p.numel() for module in modules for p in module.parameters())
        expected = sum(p.numel() for key in own if isinstance(reference[key], torch.nn.Module) for p in reference[key].parameters())
        assert resident == expected > 0


def test_encoder_hands_on_exactly_the_declared_tensors(stages) -> None:
    specs = [job(prompt="short"), job(prompt="a longer prompt " * 200, guidance=5.0), job(prompt="x", guidance=2.0)]
    unguided, guided, guided_too = stages["encode"].run(specs, [{}, {}, {}])
    assert set(unguided) == {"prompt_embeds"}
    assert set(guided) == set(guided_too) == set(FAMILY.handoff["encode"])
    for tensors in (unguided, guided, guided_too):
        assert all(t.shape[0] == 1 for t in tensors.values())
    # 512 UMT5 tokens (the stock call's default), long prompts truncated, short ones zero-padded.
    assert guided["prompt_embeds"].shape == guided["negative_prompt_embeds"].shape == (1, 512, 32)
    assert not unguided["prompt_embeds"][0, -1].any()


@pytest.mark.parametrize(("guidance", "latent_bound"), [(5.0, 4e-6), (1.0, 1e-6)])
def test_batched_jobs_match_running_each_alone(stages, guidance, latent_bound) -> None:
    """Measured with 2 jobs of one shape against each alone (float32, 5 frames of 32×32, one
    thread): guided, latents within 2.9e-6; unguided, within 4.8e-7 (batched matmuls round
    differently); frames equal in both."""
    specs = [
        job(prompt=prompt, negative_prompt=negative, seed=seed, guidance=guidance)
        for prompt, negative, seed in [("a cat", "", 1), ("two dogs on a beach at noon", "ugly", 2)]
    ]
    encoded = [handoff(t) for t in stages["encode"].run(specs, [{} for _ in specs])]
    together = stages["denoise"].run(specs, encoded)
    worst_latent = 0.0
    for spec, latents, inputs in zip(specs, together, encoded):
        [alone] = stages["denoise"].run([spec], [inputs])
        worst_latent = max(worst_latent, float((latents["latents"] - alone["latents"]).abs().max()))
    batched = generate(stages, specs)
    alone = [generate(stages, [spec])[0] for spec in specs]
    worst = max(int(np.abs(a["video"].astype(int) - b["video"].astype(int)).max()) for a, b in zip(batched, alone))
    print(f"guidance {guidance}, batched vs alone: latents within {worst_latent:.2g}, frames within {worst}/255")
    assert worst_latent <= latent_bound
    assert worst == 0
    assert not np.array_equal(batched[0]["video"], batched[1]["video"])  # no job got the other's video


def test_denoiser_reports_every_step_and_hands_on_latents_channels_first(stages) -> None:
    spec = job(steps=3, frames=9, width=48)
    encoded = stages["encode"].run([spec], [{}])
    steps: list[tuple[int, int]] = []
    [latents] = stages["denoise"].run([spec], encoded, lambda k, n: steps.append((k, n)))
    assert steps == [(k, 3) for k in range(1, 4)]
    # 16 channels, (9 - 1) / 4 + 1 latent frames, 4×6 latent pixels.
    assert set(latents) == {"latents"} and latents["latents"].shape == (1, 16, 3, 4, 6)


@pytest.mark.parametrize(
    ("update", "field"),
    [({"frames": 4}, "frames"), ({"frames": 7}, "frames"), ({"height": 24}, "height"), ({"width": 36}, "width")],
)
def test_check_names_the_field(stages, tiny_models_dir: Path, update: dict, field: str) -> None:
    spec = job(**update)
    for stage in stages.values():
        with pytest.raises(SpecError) as error:
            stage.check(spec)
        assert error.value.field == field
    with pytest.raises(SpecError) as error:
        check_spec(spec, Settings(models_dir=tiny_models_dir))
    assert error.value.field == field


def test_geometry_comes_from_the_configs(directory: Path) -> None:
    geometry = FAMILY.geometry(directory)
    # 8× VAE and 2×2 patches; frames 4k + 1.
    assert (geometry.vae_scale_factor, geometry.size_multiple, geometry.temporal_factor) == (8, 16, 4)
    assert (geometry.max_sequence_length, geometry.guidance) == (512, "cfg")
    for frames in (1, 5, 9, 81):
        geometry.check(job(frames=frames))


def test_preset_is_the_same_bytes_when_built_again(directory: Path, tmp_path: Path) -> None:
    def file_bytes(root: Path) -> dict[str, bytes]:
        return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}

    assert file_bytes(init_model(MODEL, tmp_path / MODEL)) == file_bytes(directory)


def test_bfloat16_split_run_is_pixel_identical_to_the_stock_pipeline(tiny_models_dir: Path, directory: Path) -> None:
    settings = Settings(models_dir=tiny_models_dir, dtype="bfloat16")
    stages = {stage: load_stage_model(MODEL, stage, settings) for stage in STAGES}
    stock = WanPipeline.from_pretrained(directory, dtype=torch.bfloat16)
    stock.set_progress_bar_config(disable=True)
    spec = job(width=48, frames=9, guidance=5.0)
    [out] = generate(stages, [spec])
    np.testing.assert_array_equal(out["video"], np.stack([np.array(f) for f in FAMILY.stock_call(stock, spec).frames[0]]))
