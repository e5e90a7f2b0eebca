"""Runtime cost profiles rewritten for the predictor predict what the emulated stages take."""

from __future__ import annotations

import pytest

from disagfusion.config import Settings
from disagfusion.profiles import CostProfile as RuntimeProfile
from disagfusion.protocol import STAGES, JobSpec
from services.scheduler.config import PROFILES_DIR
from services.scheduler.model_profiles import from_runtime, live_profiles
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
