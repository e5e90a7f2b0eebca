"""The planner: run a trace through the simulation with a policy and report what it would
deploy and the throughput and latency to expect; and the oracle, the best static allocation of
each phase found by search, that the policies are measured against."""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np
from pydantic import BaseModel

from disagfusion.cost import CostProfile
from disagfusion.memory import GB, StageMemory
from disagfusion.protocol import STAGES
from services.scheduler.config import SchedulerSettings
from services.scheduler.controller import Controller
from services.scheduler.monolithic import Offload, offloaded, simulate_monolithic
from services.scheduler.policies import Policy, Scheduled, make_policy
from services.scheduler.pool import Allocation, Pool, empty_allocation, fit_to_pool, per_stage
from services.scheduler.predictor import Predictor
from services.scheduler.simulation import JobRecord, SimResult, Simulation, StageWorkers
from services.scheduler.trace import TraceEntry

SLO_FACTOR = 5.0
"""A job meets its SLO when its latency is within this many times its unloaded service time."""


class PhaseReport(BaseModel):
    phase: str
    jobs: int
    completed: int
    throughput: float
    """Jobs per second: the phase's completed jobs over first arrival to last completion."""
    p50_s: float
    p95_s: float
    slo: float
    """Fraction of the phase's jobs within SLO_FACTOR × their unloaded service time."""


class StageDeployment(BaseModel):
    stage: str
    peak: dict[str, int]
    """Most instances per device class at any tick: what to provision."""
    mean: float
    """Time-averaged instances serving."""
    memory_gb: float | None = None
    """Memory one instance needs (the largest model served; None: not known)."""
    memory_model: str | None = None
    """The model that sets ``memory_gb``."""


class BaselineReport(BaseModel):
    mode: str
    """``monolithic``: every device runs whole jobs (services/scheduler/monolithic.py)."""
    phases: list[PhaseReport]
    overall: PhaseReport
    offloaded: dict[str, list[str]]
    """Per device class, the stages its pipeline offloads for lack of memory."""
    throughput_ratio: float
    """The plan's throughput over the baseline's."""
    p95_ratio: float
    """The baseline's p95 latency over the plan's: how many times lower the plan's is."""


class PlanReport(BaseModel):
    policy: str
    pool: str
    jobs: int
    simulated_s: float
    deployment: list[StageDeployment]
    phases: list[PhaseReport]
    overall: PhaseReport
    instance_starts: int
    predictor_error: dict[str, float | None]
    """Per model/stage, the predictor's running relative error at the end."""
    class_memory_gb: dict[str, float | None] = {}
    """Memory of each device class of the pool (None: unknown)."""
    baseline: BaselineReport | None = None
    """The same trace on the same pool served another way, to compare against."""


def ideal_latency(truth: Predictor, record: JobRecord) -> float:
    return sum(truth.job_costs(record.spec))


def phase_metrics(name: str, records: Sequence[JobRecord], truth: Predictor, slo_factor: float = SLO_FACTOR) -> PhaseReport:
    done = [r for r in records if not math.isnan(r.done)]
    if not records:
        return PhaseReport(phase=name, jobs=0, completed=0, throughput=0.0, p50_s=0.0, p95_s=0.0, slo=0.0)
    latencies = np.array([r.done - r.arrived for r in done]) if done else np.array([math.inf])
    span = (max(r.done for r in done) - min(r.arrived for r in records)) if done else math.inf
    met = sum(1 for r in done if r.done - r.arrived <= slo_factor * ideal_latency(truth, r))
    return PhaseReport(
        phase=name,
        jobs=len(records),
        completed=len(done),
        throughput=len(done) / span if span > 0 else 0.0,
        p50_s=float(np.percentile(latencies, 50)),
        p95_s=float(np.percentile(latencies, 95)),
        slo=met / len(records),
    )


def phases_of(trace: Sequence[TraceEntry]) -> list[tuple[str, float, float]]:
    """(label, first arrival, last arrival) of each phase, in trace order."""
    spans: dict[str, list[float]] = {}
    for entry in trace:
        span = spans.setdefault(entry.phase or "all", [entry.t, entry.t])
        span[1] = entry.t
    return [(name, a, b) for name, (a, b) in spans.items()]


def report(policy: str, pool_text: str, result: SimResult, truth: Predictor, predictor: Predictor,
           pool: Pool | None = None, memory: Mapping[str, StageMemory] | None = None) -> PlanReport:
    by_phase: dict[str, list[JobRecord]] = {}
    for record in result.jobs:
        by_phase.setdefault(record.phase or "all", []).append(record)
    deployment = []
    for stage in STAGES:
        peak: dict[str, int] = {}
        for _, allocation in result.allocations:
            for name, n in allocation.get(stage, {}).items():
                peak[name] = max(peak.get(name, 0), n)
        points = result.timeline
        area = sum((b.t - a.t) * a.running[stage] for a, b in zip(points, points[1:]))
        mean = area / (points[-1].t - points[0].t) if len(points) > 1 and points[-1].t > points[0].t else 0.0
        need = (memory or {}).get(stage)
        deployment.append(StageDeployment(
            stage=stage, peak=peak, mean=mean,
            memory_gb=need.total_bytes / GB if need is not None and need.source != "unknown" else None,
            memory_model=need.model if need is not None else None,
        ))
    return PlanReport(
        policy=policy,
        pool=pool_text,
        jobs=len(result.jobs),
        simulated_s=result.end,
        deployment=deployment,
        phases=[phase_metrics(name, records, truth) for name, records in by_phase.items()],
        overall=phase_metrics("all", result.jobs, truth),
        instance_starts=result.instance_starts,
        predictor_error={f"{e.model}/{e.stage}": e.rel_error for e in predictor.errors()},
        class_memory_gb={c.name: c.memory_gb for c in pool.classes} if pool is not None else {},
    )


def even_split(pool: Pool) -> Allocation:
    """A naive starting fleet: the pool shared equally among the stages each class may host."""
    allocation = empty_allocation()
    for c in pool.classes:  # a class that fits no stage (Pool.fitted) hosts none
        for k, stage in enumerate(c.stages):
            n = c.count // len(c.stages) + (1 if k < c.count % len(c.stages) else 0)
            if n:
                allocation[stage][c.name] = n
    return allocation


def simulate(
    trace: Sequence[TraceEntry],
    pool: Pool,
    policy: Policy,
    profiles: Collection[CostProfile],
    settings: SchedulerSettings,
    initial: Allocation | None = None,
    truth_profiles: Collection[CostProfile] | None = None,
    **options,
) -> tuple[SimResult, Predictor, Predictor]:
    predictor = Predictor(profiles)
    truth = Predictor(truth_profiles or profiles)
    sim = Simulation(trace, pool, policy, predictor, settings, truth=truth, initial=initial, **options)
    return sim.run(), predictor, truth


def _compositions(total: int) -> list[tuple[int, int, int]]:
    """Every way to give each of the three stages at least one of ``total`` slots, all used."""
    return [(a, b, total - a - b) for a in range(1, total - 1) for b in range(1, total - a)]


def search_static(
    trace: Sequence[TraceEntry],
    pool: Pool,
    profiles: Collection[CostProfile],
    settings: SchedulerSettings,
    exhaustive_up_to: int = 24,
    rounds: int = 6,
    workers: Mapping[str, StageWorkers] | None = None,
) -> tuple[Allocation, PhaseReport]:
    """The static allocation with the best throughput on ``trace`` (then best p95), every
    instance ready from the start. Small single-class pools: every composition. Otherwise: start
    from the demand ratio the controller's placement gives, then hill-climb moving slots between
    stages (in halving steps), each candidate judged by simulation of instances that take work
    as ``workers`` say (default: as this environment's stage settings would)."""
    shifted = [entry.model_copy(update={"t": entry.t - trace[0].t}) for entry in trace]

    def score(allocation: Allocation) -> tuple[tuple[float, float], PhaseReport]:
        static = Scheduled("static", [(0.0, allocation)])
        result, _, truth = simulate(shifted, pool, static, profiles, settings, initial=allocation, observe=False,
                                    workers=workers)
        metrics = phase_metrics("search", result.jobs, truth)
        # Throughputs within 1% are a tie (the measured span jitters); then lower p95 wins.
        bucket = math.floor(math.log(metrics.throughput) / math.log(1.01)) if metrics.throughput > 0 else -math.inf
        return (bucket, -metrics.p95_s), metrics

    if len(pool.classes) == 1 and pool.total <= exhaustive_up_to:
        best = None
        for counts in _compositions(pool.total):
            allocation = fit_to_pool(dict(zip(STAGES, counts)), pool)
            key, metrics = score(allocation)
            if best is None or key > best[0]:
                best = (key, allocation, metrics)
        assert best is not None
        return best[1], best[2]

    truth = Predictor(profiles)
    span = max(shifted[-1].t, 1.0)
    work = {stage: 0.0 for stage in STAGES}
    for entry in shifted:
        for stage, cost in zip(STAGES, truth.job_costs(entry.spec)):
            work[stage] += cost / span
    placer = Controller(pool, settings.model_copy(update={"fill_pool": True}))
    current = placer.place(work, {})
    best_key, best_metrics = score(current)
    step = max(1, pool.total // 16)
    for _ in range(rounds):
        improved = False
        counts = per_stage(current)
        for src, dst in itertools.permutations(STAGES, 2):
            if counts[src] - step < 1:
                continue
            moved = dict(counts)
            moved[src] -= step
            moved[dst] += step
            candidate = fit_to_pool(moved, pool, order=sorted(STAGES, key=lambda s: len(pool.preference(s))))
            key, metrics = score(candidate)
            if key > best_key:
                best_key, best_metrics, current, improved = key, metrics, candidate, True
                break
        if not improved:
            if step == 1:
                break
            step = max(1, step // 2)
    return current, best_metrics


def oracle_schedule(
    trace: Sequence[TraceEntry],
    pool: Pool,
    profiles: Collection[CostProfile],
    settings: SchedulerSettings,
    workers: Mapping[str, StageWorkers] | None = None,
) -> list[tuple[float, Allocation]]:
    """The best static allocation of each phase, switched to when the phase begins."""
    schedule = []
    for name, start, _ in phases_of(trace):
        phase = [e for e in trace if (e.phase or "all") == name]
        allocation, _ = search_static(phase, pool, profiles, settings, workers=workers)
        schedule.append((start, allocation))
    return schedule


def plan(
    trace: Sequence[TraceEntry],
    pool: Pool,
    profiles: Collection[CostProfile],
    settings: SchedulerSettings,
    pool_text: str = "",
    policy: str = "hybrid",
    memory: Mapping[str, StageMemory] | None = None,
    baseline: str | None = None,
    offload: Offload | None = None,
    workers: Mapping[str, StageWorkers] | None = None,
) -> PlanReport:
    """What the scheduler would deploy for ``trace`` on ``pool`` and what it would achieve.
    With ``memory`` (per stage, what an instance needs: ``disagfusion.memory``) each stage is
    placed only on classes it fits (``Pool.fitted``; ``PlacementError`` if one fits nowhere).
    ``baseline="monolithic"`` also serves the trace with a whole pipeline per device on the same
    pool, offloading where memory is short (``offload``: its cost), and compares."""
    fitted = pool.fitted(memory) if memory else pool
    chosen = make_policy(policy, fitted, settings, static=even_split(fitted) if policy == "static" else None)
    result, predictor, truth = simulate(trace, fitted, chosen, profiles, settings, initial=even_split(fitted), workers=workers)
    planned = report(policy, pool_text, result, truth, predictor, fitted, memory)
    if baseline is None:
        return planned
    if baseline != "monolithic":
        raise ValueError(f"unknown baseline {baseline!r}; the one baseline is monolithic")
    needs = memory or {}
    records = simulate_monolithic(trace, pool, truth, needs, offload)
    by_phase: dict[str, list[JobRecord]] = {}
    for record in records:
        by_phase.setdefault(record.phase or "all", []).append(record)
    overall = phase_metrics("all", records, truth)
    planned.baseline = BaselineReport(
        mode=baseline,
        phases=[phase_metrics(name, rs, truth) for name, rs in by_phase.items()],
        overall=overall,
        offloaded={c.name: list(offloaded(c, needs)) for c in pool.classes},
        throughput_ratio=planned.overall.throughput / overall.throughput if overall.throughput > 0 else math.inf,
        p95_ratio=overall.p95_s / planned.overall.p95_s if planned.overall.p95_s > 0 else math.inf,
    )
    return planned
