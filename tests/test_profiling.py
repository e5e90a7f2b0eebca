"""`disagfusion profile`: measuring the tiny model's real stages over a small grid, fitting the
predictor's terms, and writing a cost profile the scheduler's predictor loads."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from disagfusion_cli import app
from disagfusion.config import Settings
from disagfusion.cost import load_profiles
from disagfusion.models.base import SpecError
from disagfusion.profiling import Fit, Grid, Measurement, fit, measure
from disagfusion.protocol import STAGES, JobSpec
from services.scheduler.predictor import Predictor

GRID = dict(sizes="64,128", steps="1,3", guidance="1,4.5", prompt_chars="16,120", batches="1,2")
"""Small enough for a test (28 stage shapes of the tiny model, well under a second each)."""


@pytest.fixture(scope="module")
def measured(tiny_models_dir: Path) -> Measurement:
    torch.set_num_threads(1)  # a shared CPU: threads only add noise to milliseconds
    return measure("tiny", Settings(models_dir=tiny_models_dir), Grid(**GRID), runs=3)


@pytest.fixture(scope="module")
def fitted(measured: Measurement) -> Fit:
    return fit(measured)


def job(**fields) -> JobSpec:
    return JobSpec(model="tiny", prompt="a lighthouse at dusk", **({"height": 64, "width": 64, "guidance": 1.0} | fields))


def test_grid_takes_comma_separated_text_and_refuses_nonsense() -> None:
    grid = Grid(sizes="64, 96x32", steps="2,4", guidance="1,4.5", batches="1")
    assert grid.sizes == ((64, 64), (96, 32)) and grid.steps == (2, 4) and grid.guidance == (1.0, 4.5)
    assert grid.text("sizes") == "64x64,96x32"
    for bad in (dict(steps="0"), dict(steps=""), dict(sizes="64xq"), dict(batches="1.5")):
        with pytest.raises(ValidationError):
            Grid(**bad)


def test_each_stage_is_timed_once_per_shape_its_cost_depends_on(measured: Measurement) -> None:
    counts = {stage: len(samples) for stage, samples in measured.by_stage().items()}
    # encode: prompt lengths x guidance on/off x batches; denoise: sizes x steps x guidance x batches;
    # decode: sizes x batches. Nothing else changes their cost.
    assert counts == {"encode": 8, "denoise": 16, "decode": 4}
    assert len(measured.samples) == Grid(**GRID).measurements("tiny")
    assert all(s.seconds > 0 and s.batch == len(s.jobs) for s in measured.samples)
    assert measured.device == "cpu" and measured.threads == 1 and measured.machine["cores"]


def test_fit_keeps_to_the_predictors_terms(fitted: Fit) -> None:
    for stage, cost in fitted.profile.stages.items():
        assert cost.batch_exponent == 1.0 and cost.per_mpixel2_s == 0.0, stage
    assert fitted.profile.stages["denoise"].per_step
    assert set(fitted.median_error) == set(STAGES)
    assert "disagfusion profile" in fitted.profile.source and "fit error" in fitted.profile.source
    # The profile carries each stage's weight bytes from the files, for placement by memory.
    assert set(fitted.profile.weight_bytes) == set(STAGES) and all(fitted.profile.weight_bytes.values())


def test_the_written_profile_predicts_the_measured_samples(measured: Measurement, fitted: Fit, tmp_path: Path) -> None:
    fitted.profile.save(tmp_path / "tiny-cpu.yaml")
    predictor = Predictor(load_profiles([tmp_path]).values())
    predicted = [predictor.predict(s.stage, s.jobs) for s in measured.samples]
    # The file predicts what the fit does (four significant digits)...
    assert predicted == pytest.approx([fitted.profile.seconds(s.stage, s.jobs) for s in measured.samples], rel=2e-3)
    # ...and that is near what was measured. Timings of milliseconds on a shared machine are
    # noisy (another process's time slice is a few of them), so the bounds are generous.
    ratios = [p / s.seconds for p, s in zip(predicted, measured.samples)]
    assert 0.5 < statistics.median(ratios) < 2.0, ratios
    assert sum(1 / 3 < r < 3 for r in ratios) >= 0.75 * len(ratios), ratios


def test_predictions_are_positive_and_grow_with_steps_and_size(fitted: Fit) -> None:
    predictor = Predictor([fitted.profile])
    small, more_steps, larger = job(steps=1), job(steps=3), job(steps=1, height=128, width=128)
    assert all(c > 0 for c in predictor.job_costs(small))
    assert predictor.predict("denoise", [more_steps]) > predictor.predict("denoise", [small])
    assert sum(predictor.job_costs(larger)) > sum(predictor.job_costs(small))
    guided = small.model_copy(update={"guidance": 4.5})
    assert predictor.predict("denoise", [guided]) > predictor.predict("denoise", [small])


def test_a_size_the_model_cannot_run_is_refused_before_timing(tiny_models_dir: Path) -> None:
    with pytest.raises(SpecError, match="multiple of 8"):
        measure("tiny", Settings(models_dir=tiny_models_dir), Grid(sizes="60"), runs=1)


runner = CliRunner()


def said(result) -> str:
    return " ".join(result.output.split())


def test_profile_command_writes_a_profile_the_scheduler_loads(tiny_models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "profiles" / "tiny-cpu.yaml"
    result = runner.invoke(app, [
        "profile", "tiny", "--models-dir", str(tiny_models_dir), "--out", str(out), "--runs", "1", "--threads", "1",
        "--sizes", "64", "--steps", "1,2", "--guidance", "1", "--prompt-chars", "16", "--batches", "1,2",
    ])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in said(result)
    profile = load_profiles([out.parent])["tiny-cpu"]
    assert profile.kind == "measured" and profile.model == "tiny" and set(profile.fit_error) == set(STAGES)
    assert "--steps 1,2 " in profile.source and "--threads 1" in profile.source and "1 torch thread" in profile.source
    assert Predictor([profile]).predict("denoise", [job(steps=2)]) > 0


def test_profile_command_names_an_unknown_model(tmp_path: Path) -> None:
    result = runner.invoke(app, ["profile", "no-such-model", "--models-dir", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert "unknown model 'no-such-model'" in said(result) and str(tmp_path / "missing") in said(result)
    assert not list(tmp_path.rglob("*.yaml"))


def test_profile_command_refuses_a_model_name_that_is_no_subject_token(tmp_path: Path) -> None:
    result = runner.invoke(app, ["profile", "wan2.1-t2v", "--models-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "model name 'wan2.1-t2v' is not 1-64 letters" in said(result) and "Traceback" not in result.output


def test_profile_command_refuses_a_bad_grid(tiny_models_dir: Path) -> None:
    result = runner.invoke(app, ["profile", "tiny", "--models-dir", str(tiny_models_dir), "--steps", "two"])
    assert result.exit_code == 1 and "--steps" in said(result)
