"""What the scheduler observes per stage, fused from JetStream consumer state and the workers'
timing samples: backlog, idle pulls, arrival rate, measured service times, throughput and, the
part no lag-only autoscaler has, the predicted work queued at each stage *for every later stage*
(a video job waiting for the encoder is already DiT work)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from disagfusion.protocol import STAGES, JobSpec, TimingSample
from services.scheduler.predictor import Predictor


class ConsumerCounts(Protocol):
    """The fields of nats-py's ``ConsumerInfo`` the scheduler reads."""

    num_pending: int
    num_ack_pending: int
    num_waiting: int


@dataclass
class StageView:
    stage: str
    running: int = 0
    pending: int = 0
    """Tasks in the stream not yet delivered (JetStream ``num_pending``)."""
    in_flight: int = 0
    """Delivered, not yet acked (``num_ack_pending``)."""
    waiting: int = 0
    """Pull requests waiting for work (``num_waiting``): idle instances."""
    arrival_rate: float = 0.0
    """Jobs per second entering this stage's queue (smoothed)."""
    incoming_work: float = 0.0
    """Predicted reference-device seconds of this stage's work entering the pipeline per second."""
    queued_work: dict[str, float] = field(default_factory=dict)
    """Predicted seconds, at this stage and every later one, of the jobs queued or in flight here."""
    queued_due: dict[str, float] = field(default_factory=dict)
    """The part of ``queued_work`` due within the drain horizon: a job whose latency budget is
    longer than the horizon (a video) needs only horizon/budget of its work done by then."""
    measured_s: float | None = None
    """Measured seconds per job (smoothed), normalised to the reference device."""
    predicted_s: float | None = None
    """What the predictor said for the same jobs."""
    throughput: float = 0.0
    """Jobs per second completed by this stage (smoothed)."""

    @property
    def backlog(self) -> int:
        return self.pending + self.in_flight

    @property
    def held_fraction(self) -> float:
        """Of the tasks at this stage, the part its instances hold (delivered, not yet acked)."""
        return self.in_flight / self.backlog if self.backlog else 0.0

    @property
    def utilisation(self) -> float:
        """Busy fraction of the running instances: those not holding an idle pull. A worker
        between two pull requests holds none, so a stage with nothing queued or in flight (no
        instance has anything to work on) counts as idle whatever the pulls say."""
        if self.running <= 0 or self.backlog == 0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - self.waiting / self.running))

    @property
    def throughput_per_instance(self) -> float:
        return self.throughput / self.running if self.running else 0.0


@dataclass
class Observation:
    t: float
    stages: dict[str, StageView]

    def future_work(self, stage: str) -> float:
        """Seconds of ``stage`` work already in the system: queued or in flight at this stage or
        any earlier one."""
        upto = STAGES.index(stage)
        return sum(self.stages[u].queued_work.get(stage, 0.0) for u in STAGES[: upto + 1])

    def due_work(self, stage: str) -> float:
        """Of ``future_work``, what is due within the drain horizon."""
        upto = STAGES.index(stage)
        return sum(self.stages[u].queued_due.get(stage, 0.0) for u in STAGES[: upto + 1])

    def waiting_work(self, stage: str, due: bool = True) -> float:
        """Of ``due_work`` (or all of ``future_work``), what no instance of ``stage`` holds yet:
        the work its own instances hold is served by the capacity they occupy, which the
        arrival term already provisions; only what waits needs more. Work held upstream (an
        encoder's batch) still waits for this stage."""
        view = self.stages[stage]
        queued = view.queued_due if due else view.queued_work
        total = self.due_work(stage) if due else self.future_work(stage)
        return total - queued.get(stage, 0.0) * view.held_fraction


def consumer_counts(view: StageView, info: ConsumerCounts) -> None:
    """Copy a JetStream consumer's counts into ``view`` (nats-py ``ConsumerInfo`` or alike)."""
    view.pending, view.in_flight, view.waiting = info.num_pending, info.num_ack_pending, info.num_waiting


class _Smoothed:
    """Exponentially weighted rate/value over irregular intervals, time constant ``tau``."""

    def __init__(self, tau: float):
        self.tau, self.value, self.primed = tau, 0.0, False

    def add(self, sample: float, dt: float) -> float:
        alpha = 1.0 - math.exp(-dt / self.tau) if dt > 0 else 0.0
        self.value = sample if not self.primed else self.value + alpha * (sample - self.value)
        self.primed = self.primed or dt > 0
        return self.value


class Feedback:
    """Fed with every task entering a stage queue (the scheduler sees ``df.work.>``), every timing
    sample (``df.metrics.<stage>``) and JetStream consumer counts; ``snapshot`` sums it up."""

    def __init__(self, predictor: Predictor, tau_s: float = 20.0, horizon_s: float = 60.0, latency_budget: float = 5.0):
        self._predictor = predictor
        self._horizon_s, self._latency_budget = horizon_s, latency_budget
        self._queued: dict[str, dict[str, tuple[float, ...]]] = {s: {} for s in STAGES}
        # Per stage: predicted seconds for each stage, then the due part of each (see queued_due).
        self._queued_sum: dict[str, list[float]] = {s: [0.0] * 2 * len(STAGES) for s in STAGES}
        self._counts: dict[str, ConsumerCounts | None] = {s: None for s in STAGES}
        self._entered = {s: 0 for s in STAGES}
        self._entered_work = [0.0] * len(STAGES)
        self._done = {s: 0 for s in STAGES}
        self._rate = {s: _Smoothed(tau_s) for s in STAGES}
        self._work_rate = [_Smoothed(tau_s) for _ in STAGES]
        self._throughput = {s: _Smoothed(tau_s) for s in STAGES}
        self._measured = {s: _Smoothed(tau_s) for s in STAGES}
        self._predicted = {s: _Smoothed(tau_s) for s in STAGES}
        self._seen_sample = {s: False for s in STAGES}
        self._last_t: float | None = None
        self._mean_job_costs: list[float] = [0.0] * len(STAGES)

    def on_enqueue(self, stage: str, job: JobSpec) -> None:
        costs = self._predictor.job_costs(job)
        share = min(1.0, self._horizon_s / (self._latency_budget * sum(costs)))
        entry = (*costs, *(c * share for c in costs))
        self._queued[stage][job.job_id] = entry
        total = self._queued_sum[stage]
        n = len(STAGES)
        for i in range(STAGES.index(stage), n):
            total[i] += entry[i]
            total[n + i] += entry[n + i]
        self._entered[stage] += 1
        if stage == STAGES[0]:
            for i, c in enumerate(costs):
                self._entered_work[i] += c
            self._mean_job_costs = [0.9 * m + 0.1 * c for m, c in zip(self._mean_job_costs, costs)] if any(self._mean_job_costs) else list(costs)

    def on_sample(self, sample: TimingSample, speed: float = 1.0) -> None:
        """A finished batch: its jobs leave the stage; its time (on a device ``speed`` times the
        reference) feeds the measured service time."""
        queued, total = self._queued[sample.stage], self._queued_sum[sample.stage]
        first = STAGES.index(sample.stage)
        predicted = 0.0
        n = len(STAGES)
        for job in sample.jobs:
            entry = queued.pop(job.job_id, None)
            if entry is not None:
                for i in range(first, n):
                    total[i] -= entry[i]
                    total[n + i] -= entry[n + i]
                predicted += entry[first]
        if not queued:
            total[:] = [0.0] * 2 * n
        self._done[sample.stage] += len(sample.jobs)
        jobs = max(len(sample.jobs), 1)
        dt = 1.0 if self._seen_sample[sample.stage] else 0.0  # one step per sample
        self._measured[sample.stage].add(sample.seconds * speed / jobs, dt)
        self._predicted[sample.stage].add(predicted / jobs, dt)
        self._seen_sample[sample.stage] = True

    def on_consumer_info(self, stage: str, info: ConsumerCounts) -> None:
        self._counts[stage] = info

    def snapshot(self, t: float, running: dict[str, int]) -> Observation:
        dt = 0.0 if self._last_t is None else t - self._last_t
        self._last_t = t
        views = {}
        for i, stage in enumerate(STAGES):
            view = StageView(stage=stage, running=running.get(stage, 0))
            tracked = len(self._queued[stage])
            info = self._counts[stage]
            if info is not None:
                consumer_counts(view, info)
            else:
                view.pending = tracked
            # JetStream is the truth about how many; the tracker knows what they are. Scale the
            # tracked cost to the real count (the scheduler may have restarted and missed tasks).
            if tracked:
                factor = view.backlog / tracked if info is not None else 1.0
                sums = [x * factor for x in self._queued_sum[stage]]
            else:
                sums = [view.backlog * c for c in self._mean_job_costs] * 2
            n = len(STAGES)
            view.queued_work = {s: max(sums[j], 0.0) for j, s in enumerate(STAGES) if j >= i}
            view.queued_due = {s: max(sums[n + j], 0.0) for j, s in enumerate(STAGES) if j >= i}
            if dt > 0:
                view.arrival_rate = self._rate[stage].add(self._entered[stage] / dt, dt)
                view.throughput = self._throughput[stage].add(self._done[stage] / dt, dt)
                view.incoming_work = self._work_rate[i].add(self._entered_work[i] / dt, dt)
            else:
                view.arrival_rate, view.throughput = self._rate[stage].value, self._throughput[stage].value
                view.incoming_work = self._work_rate[i].value
            if self._seen_sample[stage]:
                view.measured_s, view.predicted_s = self._measured[stage].value, self._predicted[stage].value
            views[stage] = view
        if dt > 0:
            self._entered = {s: 0 for s in STAGES}
            self._done = {s: 0 for s in STAGES}
            self._entered_work = [0.0] * len(STAGES)
        return Observation(t=t, stages=views)
