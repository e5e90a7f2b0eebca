"""Placement by memory: a stage goes only where its weights and working memory fit, the pool
says clearly when one fits nowhere, and `disagfusion plan` shows what each instance needs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from disagfusion.config import Settings
from disagfusion.cost import CostProfile
from disagfusion.memory import GB, fleet_memory, model_memory
from disagfusion.protocol import JobSpec
from disagfusion_cli import app
from services.scheduler.controller import Controller
from services.scheduler.planner import plan
from services.scheduler.pool import PlacementError, fit_to_pool, parse_pool
from services.scheduler.trace import TraceEntry, write_trace

from .conftest import steady

# Weights per stage in bf16 (2 bytes a parameter) from the model cards' parameter counts: umt5-xxl
# ~4.7B, Wan2.1 DiT 14B or 1.3B, Wan VAE ~0.1B.
WAN_14B = {"encode": 9_400_000_000, "denoise": 28_000_000_000, "decode": 200_000_000}
WAN_1_3B = {**WAN_14B, "denoise": 2_600_000_000}


def wan_profile(wan: CostProfile, name: str, weights: dict[str, int]) -> CostProfile:
    return CostProfile.model_validate({**wan.model_dump(), "model": name, "weight_bytes": weights})


def wan_job(model: str):
    return lambda n: JobSpec(job_id=f"{model}-{n}", model=model, prompt="a harbour at dawn", height=480, width=832,
                             frames=9, steps=4)


@pytest.fixture
def wan(profile_files: dict[str, CostProfile]) -> CostProfile:
    return profile_files["wan2_1-t2v-1_3b-h200"]


def needs(tmp_path, *profiles: CostProfile):
    return fleet_memory([p.model for p in profiles], profiles, Settings(models_dir=tmp_path))


def test_memory_is_weights_plus_an_allowance_or_the_profiles_figure(tmp_path, wan: CostProfile) -> None:
    memory = model_memory("wan-14b", Settings(models_dir=tmp_path), wan_profile(wan, "wan-14b", WAN_14B))
    assert memory["denoise"].source == "profile"
    assert memory["denoise"].total_bytes == pytest.approx(28e9 * 1.2)
    given = CostProfile.model_validate({**wan_profile(wan, "wan-14b", WAN_14B).model_dump(),
                                        "activation_bytes": {"denoise": 6_000_000_000}})
    assert model_memory("wan-14b", Settings(models_dir=tmp_path), given)["denoise"].total_bytes == 34_000_000_000
    assert model_memory("unknown", Settings(models_dir=tmp_path))["encode"].source == "unknown"


def test_weights_come_from_the_files_where_the_model_is_there(tmp_path, wan: CostProfile) -> None:
    from disagfusion.models import init_preset, weight_bytes

    init_preset("emulated-video", tmp_path / "emulated-video")
    (tmp_path / "emulated-video" / "profile.yaml").write_text(
        (tmp_path / "emulated-video" / "profile.yaml").read_text() + "weight_bytes: {denoise: 123}\n")
    settings = Settings(models_dir=tmp_path)
    assert weight_bytes("emulated-video", settings)["denoise"] == 123
    # The directory's bytes win over a profile that says otherwise.
    memory = model_memory("emulated-video", settings, wan_profile(wan, "emulated-video", WAN_14B))
    assert memory["denoise"].source == "files" and memory["denoise"].weight_bytes == 123


def test_a_14b_dit_lands_only_where_it_fits_and_a_1_3b_one_anywhere(tmp_path, wan: CostProfile, settings) -> None:
    pool = parse_pool("gpu80:4:::80,gpu24:8:::24")
    big = pool.fitted(needs(tmp_path, wan_profile(wan, "wan-14b", WAN_14B)))
    assert big.by_name()["gpu24"].stages == ("encode", "decode")
    assert big.by_name()["gpu80"].stages == ("encode", "denoise", "decode")
    placed = fit_to_pool({"encode": 2, "denoise": 10, "decode": 2}, big)
    assert set(placed["denoise"]) == {"gpu80"} and placed["denoise"]["gpu80"] == 4
    decided = Controller(big, settings).place({"encode": 0.5, "denoise": 20.0, "decode": 0.5}, {})
    assert set(decided["denoise"]) == {"gpu80"}

    small = pool.fitted(needs(tmp_path, wan_profile(wan, "wan-1.3b", WAN_1_3B)))
    assert small.by_name()["gpu24"].stages == ("encode", "denoise", "decode")
    assert "gpu24" in fit_to_pool({"encode": 1, "denoise": 10, "decode": 1}, small)["denoise"]
    # Serving both: an instance of a stage may get either model's job, so it must fit the larger.
    both = pool.fitted(needs(tmp_path, wan_profile(wan, "wan-14b", WAN_14B), wan_profile(wan, "wan-1.3b", WAN_1_3B)))
    assert "denoise" not in both.by_name()["gpu24"].stages


def test_a_stage_that_fits_nowhere_is_a_clear_error(tmp_path, wan: CostProfile) -> None:
    with pytest.raises(PlacementError, match=r"stage denoise of wan-14b needs 33\.6 GB.*largest: gpu24, 24 GB"):
        parse_pool("gpu24:8:::24").fitted(needs(tmp_path, wan_profile(wan, "wan-14b", WAN_14B)))
    # A class of unknown size (an emulated slot) holds anything.
    assert parse_pool("slot:12").fitted(needs(tmp_path, wan_profile(wan, "wan-14b", WAN_14B))).classes[0].stages


def test_the_planner_places_by_memory(tmp_path, wan: CostProfile, settings) -> None:
    profile = wan_profile(wan, "wan-14b", WAN_14B)
    trace = steady(wan_job("wan-14b"), 0.05, 0.0, 200.0)
    report = plan(trace, parse_pool("gpu80:2:::80,gpu24:4:::24"), [profile], settings, memory=needs(tmp_path, profile))
    denoise = next(d for d in report.deployment if d.stage == "denoise")
    assert set(denoise.peak) == {"gpu80"} and denoise.memory_gb == pytest.approx(33.6)
    assert report.class_memory_gb == {"gpu80": 80.0, "gpu24": 24.0}


def test_plan_shows_memory_per_placement_and_fails_clearly(tmp_path, wan: CostProfile, monkeypatch) -> None:
    monkeypatch.setenv("DF_MODELS_DIR", str(tmp_path / "models"))
    wan_profile(wan, "wan-14b", WAN_14B).save(tmp_path / "profiles" / "wan-14b.yaml")
    trace = tmp_path / "t.jsonl"
    write_trace(trace, [TraceEntry(t=k * 20.0, spec=wan_job("wan-14b")(k)) for k in range(5)])
    args = ["plan", "--trace", str(trace), "--profile", str(tmp_path / "profiles")]
    monkeypatch.setenv("COLUMNS", "200")  # rich sizes its tables to the terminal
    shown = CliRunner().invoke(app, [*args, "--pool", "gpu80:2:::80,gpu24:4:::24"])
    assert shown.exit_code == 0, shown.output
    assert "memory per instance" in shown.output and "33.6 GB (wan-14b) of gpu80 80 GB" in shown.output
    as_json = json.loads(CliRunner().invoke(app, [*args, "--pool", "gpu80:2:::80,gpu24:4:::24", "--json"]).output)
    assert {d["stage"]: d["memory_gb"] for d in as_json["deployment"]}["denoise"] == pytest.approx(33.6)
    refused = CliRunner().invoke(app, [*args, "--pool", "gpu24:4:::24"])
    assert refused.exit_code == 1 and "stage denoise of wan-14b needs 33.6 GB" in refused.output
    assert GB == 1e9
