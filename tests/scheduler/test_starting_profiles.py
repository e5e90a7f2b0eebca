"""The predictor starts from the models' cost profiles and predicts what the emulated stages take."""

from __future__ import annotations

import pytest

from disagfusion.config import Settings
from disagfusion.cost import CostProfile, StageCost, load_profiles
from disagfusion.profiling import STRUCTURE
from disagfusion.protocol import STAGES, JobSpec
from services.scheduler.live import starting_profiles
from services.scheduler.predictor import Predictor


def _predictor(model: str, profile: CostProfile) -> Predictor:
    return Predictor([profile.model_copy(update={"model": model})])


@pytest.mark.parametrize("steps", [4, 20, 50])
def test_per_step_profile_is_rewritten_exactly(steps: int) -> None:
    runtime = CostProfile.named("wan2_1-t2v-1_3b-h200")
    spec = JobSpec(model="video", prompt="a harbour at dawn", steps=steps, height=480, width=832, frames=33, guidance=1.0)
    predicted = _predictor("video", runtime).job_costs(spec)
    assert predicted == pytest.approx([runtime.seconds(s, [spec]) for s in STAGES], rel=1e-9)


def test_per_job_dit_cost_is_exact_at_the_reference_steps() -> None:
    runtime = CostProfile.named("bench-pipeline")
    spec = JobSpec(model="emulated", prompt="a harbour", steps=20, guidance=1.0)
    assert _predictor("emulated", runtime).job_costs(spec) == pytest.approx([0.02, 0.2, 0.05])


def test_starting_profiles_add_served_emulated_models(tmp_path) -> None:
    profiles = starting_profiles(Settings(models="emulated,image", models_dir=tmp_path))
    models = {p.model for p in profiles}
    assert {"emulated", "image"} <= models
    # image already has a profile in the directory (the placeholder): the directory's is kept
    assert [p.kind for p in profiles if p.model == "image"] == ["placeholder"]
    (emulated,) = [p for p in profiles if p.model == "emulated"]
    assert emulated.stages == CostProfile.named("bench-pipeline").stages


def test_measured_profile_is_exact_and_round_trips_through_yaml(tmp_path) -> None:
    # A fit in the predictor's terms (what `disagfusion profile` produces), with known coefficients.
    errors = {"encode": 0.05, "denoise": 0.1, "decode": 0.2}
    shape = {stage: STRUCTURE[stage].model_dump(include={"per_step", "cfg_factor"}) for stage in STAGES}
    runtime = CostProfile(model="m", hardware="cpu: test", source="measured here by a test", kind="measured", stages={
        "encode": StageCost(fixed_s=0.003, per_job_s=0.01, per_ktoken_s=0.02, **shape["encode"]),
        "denoise": StageCost(fixed_s=0.004, per_job_s=0.002, per_mpixel_s=0.3, **shape["denoise"]),
        "decode": StageCost(per_job_s=0.005, per_mpixel_s=0.7, **shape["decode"]),
    }, fit_error=errors)
    runtime.save(tmp_path / "m-cpu.yaml")
    loaded = load_profiles([tmp_path])["m-cpu"]
    assert loaded.kind == "measured" and loaded.hardware == "cpu: test" and loaded.fit_error == errors
    predictor = Predictor([loaded])
    for guidance, negative in ((1.0, ""), (4.5, ""), (4.5, "blurry")):
        for steps, side in ((4, 256), (30, 1024)):
            spec = JobSpec(model="m", prompt="a harbour at dawn, oil", negative_prompt=negative, steps=steps,
                           height=side, width=side, guidance=guidance)
            assert predictor.job_costs(spec) == pytest.approx([runtime.seconds(s, [spec]) for s in STAGES], rel=1e-3)
