"""Runtime cost profiles rewritten for the predictor predict what the emulated stages take."""

from __future__ import annotations

import pytest

from disagfusion.config import Settings
from disagfusion.cost import CostProfile as RuntimeProfile
from disagfusion.cost import StageCost
from disagfusion.profiling import PREDICTOR_TERMS, Fit
from disagfusion.protocol import STAGES, JobSpec
from services.scheduler.config import PROFILES_DIR
from services.scheduler.model_profiles import from_runtime, live_profiles, measured_profile, scheduler_profiles
from services.scheduler.predictor import CostProfile, Predictor


def _predictor(model: str, runtime: RuntimeProfile) -> Predictor:
    profile = CostProfile(source="test", device="test", models={model: from_runtime(runtime)})
    return Predictor({"test": profile})


@pytest.mark.parametrize("steps", [4, 20, 50])
def test_per_step_profile_is_rewritten_exactly(steps: int) -> None:
    runtime = RuntimeProfile.named("wan2.1-1.3b-h200")
    spec = JobSpec(model="video", prompt="a harbour at dawn", steps=steps, height=480, width=832, frames=33, guidance=1.0)
    predicted = _predictor("video", runtime).job_costs(spec)
    assert predicted == pytest.approx([runtime.seconds(s, [spec]) for s in STAGES], rel=1e-9)


def test_per_job_dit_cost_is_exact_at_the_reference_steps() -> None:
    runtime = RuntimeProfile.named("bench-pipeline")
    spec = JobSpec(model="emulated", prompt="a harbour", steps=20, guidance=1.0)
    assert _predictor("emulated", runtime).job_costs(spec) == pytest.approx([0.02, 0.2, 0.05])


def test_live_profiles_add_served_emulated_models(tmp_path) -> None:
    profiles = live_profiles(PROFILES_DIR, Settings(models="emulated,image", models_dir=tmp_path))
    models = {m for p in profiles.values() for m in p.models}
    assert {"emulated", "image"} <= models
    assert "runtime-emulated" in profiles  # image already has a predictor profile: not rewritten


def test_measured_profile_is_exact_and_round_trips_through_yaml(tmp_path) -> None:
    # A fit in the predictor's terms (what `disagfusion profile` produces), with known coefficients.
    terms = PREDICTOR_TERMS
    runtime = RuntimeProfile(model="m", hardware="cpu: test", source="measured here by a test", stages={
        "encode": StageCost(fixed_s=0.003, per_job_s=0.01, per_ktoken_s=0.02, **_shape(terms["encode"])),
        "denoise": StageCost(fixed_s=0.004, per_job_s=0.002, per_mpixel_s=0.3, **_shape(terms["denoise"])),
        "decode": StageCost(per_job_s=0.005, per_mpixel_s=0.7, **_shape(terms["decode"])),
    })
    errors = {"encode": 0.05, "denoise": 0.1, "decode": 0.2}
    measured_profile(Fit(profile=runtime, median_error=errors, max_error=errors)).save(tmp_path / "m-cpu.yaml")
    loaded = scheduler_profiles(tmp_path)["m-cpu"]
    assert loaded.kind == "measured" and loaded.device == "cpu: test" and loaded.fit_error == {"m": errors}
    predictor = Predictor({"m": loaded})
    for guidance, negative in ((1.0, ""), (4.5, ""), (4.5, "blurry")):
        for steps, side in ((4, 256), (30, 1024)):
            spec = JobSpec(model="m", prompt="a harbour at dawn, oil", negative_prompt=negative, steps=steps,
                           height=side, width=side, guidance=guidance)
            assert predictor.job_costs(spec) == pytest.approx([runtime.seconds(s, [spec]) for s in STAGES], rel=1e-3)


def _shape(terms: dict) -> dict:
    return {name: terms[name] for name in ("per_step", "cfg_factor")}
