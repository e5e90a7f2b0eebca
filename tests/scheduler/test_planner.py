from __future__ import annotations

import time

from disagfusion.cost import CostProfile
from services.scheduler.config import SchedulerSettings
from services.scheduler.planner import oracle_schedule, plan, search_static
from services.scheduler.pool import parse_pool, per_stage
from services.scheduler.trace import read_trace, write_trace

from .conftest import small_image, steady, video


def test_plan_runs_a_small_trace_fast(tmp_path, profiles: list[CostProfile], settings: SchedulerSettings) -> None:
    path = tmp_path / "trace.jsonl"
    write_trace(path, steady(small_image, 8.0, 0.0, 60.0, "images") + steady(video, 0.05, 60.0, 180.0, "video", offset=1000))
    trace = read_trace(path)
    started = time.process_time()
    report = plan(trace, parse_pool("h100:8,l4:8"), profiles, settings, pool_text="h100:8,l4:8")
    assert time.process_time() - started < 20  # generous: a guard against a runaway loop, not a benchmark
    assert [p.phase for p in report.phases] == ["images", "video"]
    assert all(p.completed == p.jobs for p in report.phases)
    assert report.overall.jobs == len(trace)
    dit = next(d for d in report.deployment if d.stage == "denoise")
    assert set(dit.peak) == {"h100"}  # l4 cannot host the video DiT


def test_static_search_finds_the_dit_heavy_split_for_video(profiles: list[CostProfile], settings: SchedulerSettings) -> None:
    trace = steady(video, 0.07, 0.0, 300.0, "video")
    allocation, metrics = search_static(trace, parse_pool("slot:8"), profiles, settings)
    assert per_stage(allocation) == {"encode": 1, "denoise": 6, "decode": 1}
    assert metrics.completed == len(trace)


def test_oracle_has_one_allocation_per_phase(profiles: list[CostProfile], settings: SchedulerSettings) -> None:
    trace = steady(small_image, 6.0, 0.0, 40.0, "a") + steady(video, 0.05, 40.0, 100.0, "b", offset=500)
    schedule = oracle_schedule(trace, parse_pool("slot:6"), profiles, settings)
    assert [t for t, _ in schedule] == [trace[0].t, 40.0]
