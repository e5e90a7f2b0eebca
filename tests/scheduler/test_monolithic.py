"""The monolithic baseline: whole jobs per device, offloading what memory cannot hold at the
published cost, and `disagfusion plan --baseline monolithic` comparing it with the plan."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from disagfusion.config import Settings
from disagfusion.cost import CostProfile
from disagfusion.memory import fleet_memory
from disagfusion_cli import app
from services.scheduler.monolithic import Offload, monolithic_devices, offloaded, simulate_monolithic
from services.scheduler.planner import plan
from services.scheduler.pool import parse_pool
from services.scheduler.predictor import Predictor
from services.scheduler.trace import TraceEntry, write_trace

from .test_memory_placement import WAN_1_3B, WAN_14B, wan_job, wan_profile


@pytest.fixture
def wan(profile_files: dict[str, CostProfile]) -> CostProfile:
    return profile_files["wan2_1-t2v-1_3b-h200"]


def test_what_a_pipeline_offloads_follows_memory(tmp_path, wan: CostProfile) -> None:
    settings = Settings(models_dir=tmp_path)
    big = fleet_memory(["wan-14b"], [wan_profile(wan, "wan-14b", WAN_14B)], settings)
    small = fleet_memory(["wan-1.3b"], [wan_profile(wan, "wan-1.3b", WAN_1_3B)], settings)
    gpu80, gpu24 = parse_pool("gpu80:1::1:80,gpu24:1::1:24").classes
    assert offloaded(gpu80, big) == ()
    assert offloaded(gpu24, big) == ("denoise",)  # 33.6 GB of DiT cannot stay; encoder and VAE can
    assert offloaded(gpu24, small) == ()  # 11.3 + 3.1 + 0.2 GB fit
    assert offloaded(parse_pool("gpu12:1::1:12").classes[0], small) == ("encode",)  # the DiT and VAE stay


def test_offload_costs_what_the_published_figures_say(tmp_path, wan: CostProfile) -> None:
    profile = wan_profile(wan, "wan-14b", WAN_14B)
    needs = fleet_memory(["wan-14b"], [profile], Settings(models_dir=tmp_path))
    truth = Predictor([profile])
    spec = wan_job("wan-14b")(0)
    encode, denoise, decode = truth.job_costs(spec)
    [gpu24] = monolithic_devices(parse_pool("gpu24:1::0.5:24"), needs)
    assert gpu24.seconds(spec, truth, needs, Offload()) == pytest.approx((encode + denoise * 1.54 + decode) / 0.5)
    streamed = gpu24.seconds(spec, truth, needs, Offload(dit_streamed=True))
    per_pass = 28.0 / Offload().transfer_gbps  # 28 GB at the rate LightX2V's 12.89 s vs 0.40 s implies
    assert spec.guided  # the DiT runs twice a step, so its weights stream twice
    assert streamed == pytest.approx((encode + denoise + decode) / 0.5 + per_pass * spec.steps * 2)
    assert Offload().transfer_gbps == pytest.approx(9.4 / 12.49)


def test_jobs_go_to_the_fastest_idle_device_first_come_first_served(tmp_path, wan: CostProfile) -> None:
    profile = wan_profile(wan, "wan-1_3b", WAN_1_3B)
    needs = fleet_memory(["wan-1_3b"], [profile], Settings(models_dir=tmp_path))
    truth = Predictor([profile])
    one = sum(truth.job_costs(wan_job("wan-1_3b")(0)))
    trace = [TraceEntry(t=0.0, spec=wan_job("wan-1_3b")(k)) for k in range(3)]
    records = simulate_monolithic(trace, parse_pool("slow:1::0.5,fast:1::1"), truth, needs)
    assert [r.done for r in records] == pytest.approx([one, 2 * one, 2 * one])  # fast, slow, fast again


def test_plan_compares_with_the_monolithic_baseline(tmp_path, wan: CostProfile, settings) -> None:
    profile = wan_profile(wan, "wan-14b", WAN_14B)
    needs = fleet_memory(["wan-14b"], [profile], Settings(models_dir=tmp_path))
    trace = [TraceEntry(t=k * 1.0, spec=wan_job("wan-14b")(k)) for k in range(8)]
    report = plan(trace, parse_pool("gpu80:2::1:80,gpu24:4::0.4:24"), [profile], settings, memory=needs,
                  baseline="monolithic", offload=Offload(dit_streamed=True))
    base = report.baseline
    assert base is not None and base.overall.completed == 8
    assert base.offloaded == {"gpu80": [], "gpu24": ["denoise"]}
    assert base.throughput_ratio == pytest.approx(report.overall.throughput / base.overall.throughput)
    assert base.p95_ratio == pytest.approx(base.overall.p95_s / report.overall.p95_s)
    # Jobs landing on a 24 GB device stream 28 GB of DiT per pass: far slower than the
    # disaggregated fleet, whose DiTs run only on the 80 GB devices.
    assert base.overall.p95_s > 5 * report.overall.p95_s and base.throughput_ratio > 1


def test_plan_cli_baseline_monolithic(tmp_path, wan: CostProfile, monkeypatch) -> None:
    monkeypatch.setenv("DF_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("COLUMNS", "200")
    wan_profile(wan, "wan-14b", WAN_14B).save(tmp_path / "profiles" / "wan-14b.yaml")
    trace = tmp_path / "t.jsonl"
    write_trace(trace, [TraceEntry(t=k * 20.0, spec=wan_job("wan-14b")(k)) for k in range(5)])
    args = ["plan", "--trace", str(trace), "--profile", str(tmp_path / "profiles"), "--pool", "gpu80:2::1:80,gpu24:4::0.4:24"]
    shown = CliRunner().invoke(app, [*args, "--baseline", "monolithic"])
    assert shown.exit_code == 0, shown.output
    assert "Against the monolithic baseline" in shown.output and "gpu24: denoise" in shown.output
    report = json.loads(CliRunner().invoke(app, [*args, "--baseline", "monolithic", "--json"]).output)
    assert report["baseline"]["mode"] == "monolithic" and report["baseline"]["overall"]["completed"] == 5
    unknown = CliRunner().invoke(app, [*args, "--baseline", "sideways"])
    assert unknown.exit_code == 1 and "unknown baseline" in unknown.output
