"""Emulated accelerators: real shapes and dtypes, profiled service times, presets on disk."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from disagfusion.config import Settings
from disagfusion.cost import CostProfile, StageCost
from disagfusion.models import PRESET_WRITERS, PROFILE_FILE, check_spec, load_stage_model, model_directory
from disagfusion.models.base import SpecError
from disagfusion.models.emulated import STAGE_MODELS, EmulatedGeometry, init_model, write_model
from disagfusion.models.pixart import FAMILY as PIXART, MAX_SEQUENCE_LENGTH
from disagfusion.protocol import STAGES, JobSpec

FAST = CostProfile(
    model="test", hardware="none", source="synthetic: test", kind="synthetic",
    stages={"encode": StageCost(per_job_s=0.01), "denoise": StageCost(per_job_s=0.05), "decode": StageCost(per_job_s=0.02)},
)


def run_pipeline(name: str, settings: Settings, specs: list[JobSpec]) -> dict[str, list[dict[str, torch.Tensor]]]:
    outputs: dict[str, list[dict[str, torch.Tensor]]] = {}
    inputs: list[dict[str, torch.Tensor]] = [{} for _ in specs]
    for stage in STAGES:
        inputs = outputs[stage] = load_stage_model(name, stage, settings).run(specs, inputs)
    return outputs


def describe(outputs: dict[str, list[dict[str, torch.Tensor]]]) -> dict:
    return {stage: [{k: (v.dtype, tuple(v.shape)) for k, v in job.items()} for job in jobs] for stage, jobs in outputs.items()}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def test_same_tensors_as_pixart(models_dir: Path) -> None:
    """An emulated model with the tiny preset's geometry hands over what pixart hands over."""
    settings = Settings(models_dir=models_dir)
    tiny = model_directory("tiny", settings)
    geometry = PIXART.geometry(tiny)
    patch_size = json.loads((tiny / "transformer" / "config.json").read_text())["patch_size"]
    text_dim = json.loads((tiny / "text_encoder" / "config.json").read_text())["d_model"]
    write_model(
        models_dir / "emulated-tiny",
        EmulatedGeometry(text_dim=text_dim, max_sequence_length=MAX_SEQUENCE_LENGTH, latent_channels=4,
                         vae_scale_factor=geometry.vae_scale_factor, patch_size=patch_size),
        FAST,
    )
    specs = [JobSpec(prompt="a red fox", height=64, width=32, steps=2, guidance=4.5, seed=s) for s in (1, 2)]
    real = run_pipeline("tiny", settings, [s.model_copy(update={"model": "tiny"}) for s in specs])
    emulated = run_pipeline("emulated-tiny", settings, [s.model_copy(update={"model": "emulated-tiny"}) for s in specs])
    assert describe(emulated) == describe(real)
    unguided = [specs[0].model_copy(update={"guidance": 1.0, "model": m}) for m in ("tiny", "emulated-tiny")]
    assert describe(run_pipeline("emulated-tiny", settings, unguided[1:])) == describe(run_pipeline("tiny", settings, unguided[:1]))


def test_outputs_are_deterministic_and_depend_on_the_job(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir)
    write_model(models_dir / "fast", EmulatedGeometry(text_dim=8, max_sequence_length=16, latent_channels=4,
                                                      vae_scale_factor=8, patch_size=2), FAST)
    job = JobSpec(model="fast", prompt="a cat", height=32, width=48, steps=2, seed=3)
    first, again = run_pipeline("fast", settings, [job]), run_pipeline("fast", settings, [job])
    other = run_pipeline("fast", settings, [job.model_copy(update={"seed": 4})])
    for stage in STAGES:
        for name, tensor in first[stage][0].items():
            assert torch.equal(tensor, again[stage][0][name]), (stage, name)
    assert not torch.equal(first["denoise"][0]["latents"], other["denoise"][0]["latents"])
    assert first["decode"][0]["image"].shape == (32, 48, 3)


def test_service_time_follows_profile_and_speed(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(models_dir / "timed", EmulatedGeometry(text_dim=8, max_sequence_length=16, latent_channels=4,
                                                       vae_scale_factor=8, patch_size=2), FAST)
    job = JobSpec(model="timed", prompt="x", height=32, width=32, steps=5)
    steps: list[tuple[int, int]] = []
    denoiser = load_stage_model("timed", "denoise", Settings(models_dir=models_dir))
    assert denoiser.service_seconds([job, job]) == pytest.approx(0.1)
    started = time.perf_counter()
    denoiser.run([job], [{}], lambda step, total: steps.append((step, total)))
    assert time.perf_counter() - started >= 0.05  # sleeping never ends early
    assert steps == [(k, 5) for k in range(1, 6)]
    monkeypatch.setenv("DF_EMULATED_SPEED", "2.5")
    faster = load_stage_model("timed", "denoise", Settings(models_dir=models_dir))
    assert faster.service_seconds([job]) == pytest.approx(0.02)


def test_video_preset_shapes_and_checks(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir)
    directory = model_directory("emulated-video", settings)
    profile = CostProfile.load(directory / PROFILE_FILE)
    assert profile.source.startswith("cited") and profile == CostProfile.named("wan2_1-t2v-1_3b-h200")
    job = JobSpec(model="emulated-video", prompt="waves", height=480, width=832, frames=81, steps=50, guidance=5.0)
    check_spec(job, settings)
    encoder = load_stage_model("emulated-video", "encode", settings)
    assert encoder.service_seconds([job]) == pytest.approx(2.3)
    denoiser = load_stage_model("emulated-video", "denoise", settings)
    assert denoiser.service_seconds([job]) == pytest.approx(312.8)
    latents = denoiser._latents(job, {})
    assert latents.shape == (1, 16, 21, 60, 104) and latents.dtype == torch.float32
    with pytest.raises(SpecError) as frames:
        check_spec(job.model_copy(update={"frames": 80}), settings)
    assert frames.value.field == "frames"
    with pytest.raises(SpecError) as width:
        check_spec(job.model_copy(update={"width": 850}), settings)
    assert width.value.field == "width" and "try 848" in str(width.value)


def test_presets_are_registered(models_dir: Path) -> None:
    assert {"tiny", "small", "emulated", "emulated-video"} <= set(PRESET_WRITERS)
    directory = model_directory("emulated", Settings(models_dir=models_dir))
    assert json.loads((directory / "model_index.json").read_text())["_class_name"] == "DisagFusionEmulated"
    assert CostProfile.load(directory / PROFILE_FILE) == CostProfile.named("bench-pipeline")


def test_a_directory_without_its_profile_says_what_to_do(tmp_path: Path) -> None:
    directory = init_model("emulated", tmp_path / "old")
    (directory / PROFILE_FILE).rename(directory / "profile.json")  # as an older version wrote it
    with pytest.raises(SpecError, match="delete it, and a preset is written anew"):
        STAGE_MODELS["decode"](directory, Settings())
