"""The discrete-event simulation running the real controller: deaths, drains, start-up."""

from __future__ import annotations

import math

from disagfusion.cost import CostProfile
from disagfusion.protocol import STAGES
from disagfusion.worker.policy import WorkerLimits
from services.scheduler.config import SchedulerSettings
from services.scheduler.controller import Controller, FleetState
from services.scheduler.feedback import Observation
from services.scheduler.planner import simulate
from services.scheduler.policies import Scheduled
from services.scheduler.pool import Allocation, parse_pool
from services.scheduler.predictor import Predictor
from services.scheduler.simulation import BATCH_KEYS, SharedStartup, StageWorkers

from .conftest import small_image, steady, video

POOL = parse_pool("slot:12")
START = {"encode": {"slot": 1}, "denoise": {"slot": 4}, "decode": {"slot": 1}}


def test_a_dead_instance_is_replaced_and_its_jobs_redelivered(profiles: list[CostProfile], settings: SchedulerSettings) -> None:
    trace = steady(small_image, 10.0, 0.0, 120.0)
    result, _, _ = simulate(trace, POOL, Controller(POOL, settings), profiles, settings, initial=START, kills=[(40.0, "denoise")])
    assert result.redelivered >= 1
    assert all(not math.isnan(r.done) for r in result.jobs) and len(result.jobs) == len(trace)
    before = next(p for p in result.timeline if p.t >= 35.0).running["denoise"]
    dip = next(p for p in result.timeline if p.t >= 40.0).running["denoise"]
    assert dip == before - 1
    # The controller still wants as many; the actuator starts a replacement that serves after start-up.
    later = next(p for p in result.timeline if p.t >= 40.0 + settings.startup_s["denoise"] + settings.tick_s)
    assert later.running["denoise"] >= before


def test_scaling_down_drains_and_loses_nothing(profiles: list[CostProfile], settings: SchedulerSettings) -> None:
    trace = steady(video, 0.12, 0.0, 200.0)
    many = {"encode": {"slot": 2}, "denoise": {"slot": 8}, "decode": {"slot": 2}}
    few = {"encode": {"slot": 1}, "denoise": {"slot": 2}, "decode": {"slot": 1}}
    policy = Scheduled("step-down", [(0.0, many), (60.0, few)])  # shrinks while batches run
    result, _, _ = simulate(trace, POOL, policy, profiles, settings, initial=many)
    assert len(result.jobs) == len(trace)
    assert all(not math.isnan(r.done) for r in result.jobs)
    assert result.redelivered == 0
    assert result.timeline[-1].running == {"encode": 1, "denoise": 2, "decode": 1}


def test_new_instances_serve_only_after_their_startup(profiles: list[CostProfile], settings: SchedulerSettings) -> None:
    trace = steady(small_image, 15.0, 0.0, 90.0)
    start = {"encode": {"slot": 1}, "denoise": {"slot": 1}, "decode": {"slot": 1}}
    result, _, _ = simulate(trace, POOL, Controller(POOL, settings), profiles, settings, initial=start)
    asked = next(p.t for p in result.timeline if p.desired["denoise"] > 1)
    served = next(p.t for p in result.timeline if p.running["denoise"] > 1)
    assert served - asked >= settings.startup_s["denoise"]


def test_the_simulation_is_deterministic_and_uses_simulated_time(profiles: list[CostProfile], settings: SchedulerSettings) -> None:
    trace = steady(video, 0.05, 0.0, 600.0)  # ten minutes of video jobs, simulated in moments

    def latencies() -> list[float]:
        result, _, _ = simulate(trace, POOL, Controller(POOL, settings), profiles, settings, initial=START)
        return [r.done - r.arrived for r in result.jobs]

    first = latencies()
    assert first == latencies()
    assert min(first) > sum(stage for stage in (2.3, 76.0, 2.9)) * 0.8  # a video takes its DiT time


def test_measured_times_teach_the_scheduler_a_wrong_profile(profiles: list[CostProfile], settings: SchedulerSettings) -> None:
    # The real device is 3x slower at the DiT than the profile the scheduler starts from.
    slower = [profile.scaled({"denoise": 3.0}) for profile in profiles]
    trace = steady(small_image, 5.0, 0.0, 120.0)
    result, predictor, truth = simulate(trace, POOL, Controller(POOL, settings), profiles, settings, initial=START, truth_profiles=slower)
    job = [small_image(0)]
    assert abs(predictor.predict("denoise", job) / truth.predict("denoise", job) - 1) < 0.1
    assert set(STAGES) <= {e.stage for e in predictor.errors()}


def test_a_pin_holds_in_the_running_fleet_until_released(profiles: list[CostProfile], settings: SchedulerSettings) -> None:
    trace = steady(small_image, 12.0, 0.0, 200.0)
    pins = [(30.0, {"denoise": 3}), (100.0, {})]
    start = {"encode": {"slot": 1}, "denoise": {"slot": 9}, "decode": {"slot": 1}}
    result, _, _ = simulate(trace, POOL, Controller(POOL, settings), profiles, settings, initial=start, pins=pins)
    during = [p.desired["denoise"] for p in result.timeline if 30.0 <= p.t < 100.0]
    assert during and set(during) == {3}
    assert all(p.running["denoise"] == 3 for p in result.timeline if 60.0 <= p.t < 100.0)  # drained down
    assert max(p.desired["denoise"] for p in result.timeline if p.t >= 100.0) >= 8  # released: back to the need
    assert all(not math.isnan(r.done) for r in result.jobs)


def test_instances_starting_together_share_the_host(profiles: list[CostProfile], settings: SchedulerSettings) -> None:
    """bench/elastic.py's fleet starts every process on one 2-core machine: six at once take
    three times as long as two."""
    shared = SharedStartup(alone_s=1.5, cpu_s=2.0, cores=2)
    assert shared.seconds(1) == 1.5 and shared.seconds(2) == 2.0 and shared.seconds(6) == 6.0
    trace = steady(small_image, 2.0, 0.0, 30.0)
    few = {"encode": {"slot": 1}, "denoise": {"slot": 1}, "decode": {"slot": 1}}
    ready = {}
    for grow in (1, 5):
        more = {"encode": {"slot": 1}, "denoise": {"slot": 1 + grow}, "decode": {"slot": 1}}
        policy = Scheduled("grow", [(0.0, few), (5.0, more)])
        result, _, _ = simulate(trace, POOL, policy, profiles, settings, initial=few, shared_startup=shared)
        ready[grow] = next(p.t for p in result.timeline if p.running["denoise"] == 1 + grow)
    assert ready[1] - 5.0 <= settings.tick_s + 2.0
    assert ready[5] - 5.0 >= 5.0


def batches_of_one(holds: int, fetch_ahead_s: float = math.inf) -> dict[str, StageWorkers]:
    """Workers that batch nothing and hold up to ``holds`` jobs ahead, fetched in the last
    ``fetch_ahead_s`` of their work (0 holds: they pull only when idle)."""
    limits = WorkerLimits(max_batch=1, holds=holds, fetch_ahead_s=fetch_ahead_s)
    return {stage: StageWorkers(limits, BATCH_KEYS[stage]) for stage in STAGES}


def test_jobs_fetched_ahead_wait_behind_the_batch_and_are_never_lost(profiles: list[CostProfile], settings: SchedulerSettings) -> None:
    """Holding jobs models the live worker's fetching ahead: a held job waits behind its instance's
    running job even while another instance idles, a draining instance hands it back, and a
    dead one's come back after AckWait. Fetching only in the last ``fetch_ahead_s`` of the
    running job (the worker's DF_FETCH_AHEAD_S) all but removes the wait."""
    trace = steady(video, 0.12, 0.0, 200.0)
    many = {"encode": {"slot": 2}, "denoise": {"slot": 8}, "decode": {"slot": 2}}
    few = {"encode": {"slot": 1}, "denoise": {"slot": 2}, "decode": {"slot": 1}}

    def run(holds: int, fetch_ahead_s: float = math.inf) -> tuple[list[float], int]:
        policy = Scheduled("step-down", [(0.0, many), (60.0, few)])
        result, _, _ = simulate(trace, POOL, policy, profiles, settings, initial=many, workers=batches_of_one(holds, fetch_ahead_s))
        assert len(result.jobs) == len(trace) and all(not math.isnan(r.done) for r in result.jobs)
        return [r.done - r.arrived for r in result.jobs], result.redelivered

    alone, redelivered = run(0)
    ahead, redelivered_ahead = run(3)
    late, _ = run(3, fetch_ahead_s=1.0)
    assert redelivered == redelivered_ahead == 0
    assert max(ahead) > max(alone)
    assert max(late) < max(ahead) and sum(late) < sum(ahead)
    busy = steady(video, 0.5, 0.0, 60.0)  # more than two DiTs serve: each holds jobs ahead
    result, _, _ = simulate(busy, POOL, Scheduled("few", [(0.0, few)]), profiles, settings, initial=few, workers=batches_of_one(3), kills=[(40.0, "denoise")])
    assert result.redelivered >= 2  # the running job and those held behind it
    assert all(not math.isnan(r.done) for r in result.jobs)
    one_dit = {"encode": {"slot": 1}, "denoise": {"slot": 1}, "decode": {"slot": 1}}
    policy = Scheduled("step-down", [(0.0, few), (30.0, one_dit)])
    result, _, _ = simulate(busy, POOL, policy, profiles, settings, initial=few, workers=batches_of_one(3))
    assert result.handed_back == 3  # the DiT scaled away held three, full as every busy DiT is
    assert result.redelivered == 0 and all(not math.isnan(r.done) for r in result.jobs)


class _Watching(Scheduled):
    """A fixed allocation that notes the DiT consumer's waiting pulls at every tick."""

    def __init__(self, allocation: Allocation):
        super().__init__("watching", [(0.0, allocation)])
        self.waiting: list[int] = []

    def decide(self, obs: Observation, fleet: FleetState, pins: dict[str, int] | None = None) -> Allocation:
        self.waiting.append(obs.stages["denoise"].waiting)
        return super().decide(obs, fleet, pins)


def test_a_worker_fetching_ahead_shows_as_a_waiting_pull(profiles: list[CostProfile], settings: SchedulerSettings) -> None:
    """JetStream's num_waiting counts the pull of a busy worker in its last DF_FETCH_AHEAD_S as
    well as an idle one's; the threshold policy reads utilisation from it, so the simulation
    must count both."""
    alone = {"encode": {"slot": 1}, "denoise": {"slot": 1}, "decode": {"slot": 1}}
    every = Predictor(profiles).predict("denoise", [video(0)]) + 0.5  # the DiT idles half a second per job
    trace = steady(video, 1.0 / every, 0.0, 20 * every)
    often = settings.model_copy(update={"tick_s": 0.25})

    def waiting_ticks(holds: int) -> int:
        policy = _Watching(alone)
        simulate(trace, POOL, policy, profiles, often, initial=alone, workers=batches_of_one(holds, 2.0))
        return sum(1 for w in policy.waiting if w)

    assert waiting_ticks(3) > 1.5 * waiting_ticks(0)


def test_the_simulation_batches_by_the_rules_the_stage_services_supply() -> None:
    from disagfusion.worker.stage_worker import StageWorker  # the dit and the decoder run it as it is
    from services.encoder.worker import EncoderWorker

    assert BATCH_KEYS == {"encode": EncoderWorker.batch_key, "denoise": StageWorker.batch_key, "decode": StageWorker.batch_key}
