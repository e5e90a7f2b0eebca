from __future__ import annotations

import random

import pytest

from disagfusion.cost import PREDICTOR_TERMS, CostProfile, StageCost, load_profiles, sampled
from disagfusion.protocol import TimingSample
from services.scheduler.predictor import Predictor

from .conftest import small_image, video


def features(stage: str, jobs: list) -> list[float]:
    """The features of the terms the predictor refines, in the structure the DiT and decoder
    profiles have (guidance doubles the DiT's work, which repeats per step)."""
    structure = {"denoise": StageCost(per_step=True, cfg_factor=2.0), "decode": StageCost()}[stage]
    return structure.features(jobs, PREDICTOR_TERMS[stage])


def test_published_profile_reproduces_the_sglang_wan_figures(profiles: list[CostProfile],
                                                            profile_files: dict[str, CostProfile]) -> None:
    predictor = Predictor(profiles)
    job = video(0).model_copy(update={"frames": 81, "steps": 50})
    encode, denoise, decode = predictor.job_costs(job)
    assert encode == pytest.approx(2.3, rel=0.01)
    assert denoise == pytest.approx(312.8, rel=0.01)
    assert decode == pytest.approx(7.1, rel=0.01)
    assert profile_files["image-placeholder"].kind == "placeholder"


def test_guidance_above_one_doubles_dit_work() -> None:
    with_cfg = features("denoise", [small_image(0, guidance=5.0)])
    without = features("denoise", [small_image(0, guidance=1.0)])
    assert with_cfg[1:] == pytest.approx(2 * without[1:])
    assert with_cfg[0] == without[0] == 1.0  # the per-batch constant does not double


def test_a_batch_sums_job_work_but_pays_the_batch_constant_once() -> None:
    assert features("decode", [small_image(0), small_image(1)]).tolist() == pytest.approx(
        [1.0, 2.0, 2 * 512 * 512 / 1e6]
    )


def test_unknown_feature_in_a_profile_is_refused(tmp_path) -> None:
    (tmp_path / "bad.yaml").write_text("model: m\nhardware: h100\nsource: x\nkind: measured\nstages:\n  denoise: {pixels: 1.0}\n")
    with pytest.raises(ValueError, match="unknown features"):
        Predictor(load_profiles([tmp_path]).values()).predict("denoise", [small_image(0).model_copy(update={"model": "m"})])


def test_refinement_from_samples_reduces_the_error(profiles: list[CostProfile], profile_files: dict[str, CostProfile]) -> None:
    # The device really is 1.8x slower per step-megapixel than the profile says, plus 0.15 s a batch.
    prior = profile_files["image-placeholder"]
    denoise = prior.stages["denoise"]
    truth = Predictor([prior.model_copy(update={"stages": {
        **prior.stages, "denoise": denoise.model_copy(update={"fixed_s": 0.15, "per_mpixel_s": denoise.per_mpixel_s * 1.8})
    }})])
    predictor = Predictor(profiles)
    rng = random.Random(1)

    def job(n: int):
        side = rng.choice([256, 512, 768, 1024])
        return small_image(n).model_copy(update={"height": side, "width": side, "steps": rng.choice([4, 20, 30])})

    held_out = [[job(10_000 + n)] for n in range(20)]

    def error() -> float:
        return sum(abs(predictor.predict("denoise", b) - truth.predict("denoise", b)) / truth.predict("denoise", b) for b in held_out) / len(held_out)

    before = error()
    for n in range(60):
        batch = [job(n)]
        seconds = truth.predict("denoise", batch) * rng.lognormvariate(0.0, 0.03)
        predictor.observe(TimingSample(stage="denoise", model="image", worker="w", batch=1, seconds=seconds, jobs=[sampled(j) for j in batch]))
    after = error()
    assert before > 0.3
    assert after < 0.08 < before
    (row,) = [e for e in predictor.errors() if e.stage == "denoise"]
    assert row.samples == 60 and row.rel_error is not None and row.rel_error < 0.1


def test_samples_from_a_slower_device_are_normalised(profiles: list[CostProfile]) -> None:
    predictor = Predictor(profiles)
    batch = [small_image(0)]
    reference = predictor.predict("denoise", batch)
    for _ in range(30):
        predictor.observe(TimingSample(stage="denoise", model="image", worker="w", batch=1, seconds=reference / 0.5, jobs=[sampled(j) for j in batch]), speed=0.5)
    assert predictor.predict("denoise", batch) == pytest.approx(reference, rel=0.02)


def test_a_scaled_profile_is_off_by_its_factor_per_stage(profiles: list[CostProfile]) -> None:
    factors = {"encode": 0.5, "denoise": 1.5, "decode": 2.0}
    true = Predictor(profiles).job_costs(video(0))
    off = Predictor([p.scaled(factors) for p in profiles]).job_costs(video(0))
    assert off == pytest.approx((0.5 * true[0], 1.5 * true[1], 2.0 * true[2]))
