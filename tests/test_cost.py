"""The cost model: the formula, the shipped profiles, and fitting coefficients back from timings."""

from __future__ import annotations

import math

import pytest

from disagfusion.config import SHIPPED_PROFILES_DIR
from disagfusion.cost import CostProfile, StageCost, fit_stage_cost, load_profiles
from disagfusion.models.emulated import PRESETS
from disagfusion.protocol import JobSpec


def spec(**fields) -> JobSpec:
    return JobSpec(prompt=fields.pop("prompt", "a cat"), **fields)


def test_every_shipped_profile_loads_and_says_where_it_comes_from() -> None:
    # The profiles the emulated presets are written with (the others are the scheduler's).
    files = sorted(SHIPPED_PROFILES_DIR / f"{preset.profile}.yaml" for preset in PRESETS.values())
    assert {f.stem for f in files} >= {"bench-pipeline", "wan2_1-t2v-1_3b-h200"}
    for path in files:
        profile = CostProfile.load(path)
        assert profile.source.startswith(("measured here", "cited", "synthetic")), path
        assert set(profile.stages) == {"encode", "denoise", "decode"}, path


def test_every_profile_in_the_directory_is_for_a_model_name_jobs_can_carry() -> None:
    profiles = load_profiles([SHIPPED_PROFILES_DIR])
    assert set(profiles) == {f.stem for f in SHIPPED_PROFILES_DIR.iterdir()}
    for name, profile in profiles.items():
        assert JobSpec(model=profile.model, prompt="x").model == profile.model, name
        assert set(profile.stages) == {"encode", "denoise", "decode"} and profile.source, name


def test_bench_pipeline_profile_is_the_synthetic_per_job_times() -> None:
    profile = CostProfile.named("bench-pipeline")
    assert "synthetic" in profile.source
    for job in (spec(), spec(height=1024, width=1024, steps=50, guidance=1.0)):
        assert profile.job_seconds(job) == pytest.approx({"encode": 0.02, "denoise": 0.2, "decode": 0.05})
    assert profile.seconds("denoise", [spec(), spec()]) == pytest.approx(0.4)


def test_wan_profile_reproduces_the_cited_figures() -> None:
    profile = CostProfile.named("wan2_1-t2v-1_3b-h200")
    job = spec(height=480, width=832, frames=81, steps=50, guidance=5.0)
    assert profile.job_seconds(job) == pytest.approx({"encode": 2.3, "denoise": 312.8, "decode": 7.1})
    # Half the steps, half the DiT; no guidance, half again; the decoder does not care about either.
    fewer = job.model_copy(update={"steps": 25, "guidance": 1.0})
    assert profile.seconds("denoise", [fewer]) == pytest.approx(312.8 / 4)
    assert profile.seconds("decode", [fewer]) == pytest.approx(7.1)


def test_formula_terms() -> None:
    cost = StageCost(fixed_s=0.5, per_job_s=1.0, per_ktoken_s=2.0, per_mpixel_s=3.0, per_mpixel2_s=4.0,
                     per_step=True, cfg_factor=2.0, batch_exponent=0.5)
    job = spec(prompt="x" * 400, negative_prompt="y" * 40, height=1000, width=1000, frames=2, steps=3, guidance=4.0)
    p = 2.0  # megapixel-frames
    work = 2 * (1.0 + 3.0 * p + 4.0 * p * p) * 3 + 2.0 * (100 + 10) / 1000
    assert cost.seconds([job]) == pytest.approx(0.5 + work)
    assert cost.seconds([job] * 4) == pytest.approx(0.5 + 4**-0.5 * 4 * work)
    assert cost.seconds([]) == 0.0
    unguided = job.model_copy(update={"guidance": 1.0})
    assert cost.seconds([unguided]) == pytest.approx(0.5 + (1.0 + 3.0 * p + 4.0 * p * p) * 3 + 2.0 * 0.1)


def test_unknown_stage_is_named() -> None:
    with pytest.raises(KeyError, match="no stage 'upscale'"):
        CostProfile.named("bench-pipeline").seconds("upscale", [spec()])


def test_fit_recovers_known_coefficients() -> None:
    truth = StageCost(fixed_s=0.01, per_job_s=0.002, per_mpixel_s=0.05, per_step=True, cfg_factor=2.0,
                      batch_exponent=0.8)
    observations = []
    for size in (256, 512, 768):
        for steps in (5, 20):
            for guidance in (1.0, 4.5):
                for n in (1, 2, 4):
                    batch = [spec(height=size, width=size, steps=steps, guidance=guidance, seed=i) for i in range(n)]
                    observations.append((batch, truth.seconds(batch)))
    fitted = fit_stage_cost(observations, per_step=True, cfg_factor=2.0)
    assert fitted.batch_exponent == pytest.approx(0.8)
    for name in ("fixed_s", "per_job_s", "per_mpixel_s"):
        assert math.isclose(getattr(fitted, name), getattr(truth, name), rel_tol=1e-6), name
    assert fitted.per_ktoken_s == pytest.approx(0.0, abs=1e-9)


def test_fit_never_returns_negative_coefficients() -> None:
    # Timings that fall with size would need a negative per-pixel cost: it is clamped at 0.
    observations = [([spec(height=s, width=s)], 1.0 / s) for s in (256, 512, 1024)]
    fitted = fit_stage_cost(observations, per_step=False)
    assert min(fitted.fixed_s, fitted.per_job_s, fitted.per_mpixel_s, fitted.per_mpixel2_s) >= 0.0


def test_fit_with_a_fixed_batch_exponent_stays_linear() -> None:
    # Batches that cost less than their jobs alone: a given exponent of 1 (the predictor's linear
    # form) is kept, and the saving lands on what a linear form can express.
    truth = StageCost(fixed_s=0.01, per_job_s=0.02, batch_exponent=0.8)
    observations = [([spec(seed=i) for i in range(n)], truth.seconds([spec(seed=i) for i in range(n)])) for n in (1, 2, 4)]
    fitted = fit_stage_cost(observations, per_step=False, use=("fixed_s", "per_job_s"), batch_exponent=1.0)
    assert fitted.batch_exponent == 1.0
    assert fit_stage_cost(observations, per_step=False, use=("fixed_s", "per_job_s")).batch_exponent == pytest.approx(0.8)


def test_named_profiles_come_from_df_profiles_dir(tmp_path, monkeypatch) -> None:
    """An installed image has no source tree; its profiles sit where DF_PROFILES_DIR says."""
    shipped = CostProfile.named("bench-pipeline")
    shipped.save(tmp_path / "elsewhere.yaml")
    monkeypatch.setenv("DF_PROFILES_DIR", str(tmp_path))
    assert CostProfile.named("elsewhere") == shipped
    with pytest.raises(FileNotFoundError, match="DF_PROFILES_DIR"):
        CostProfile.named("bench-pipeline")
