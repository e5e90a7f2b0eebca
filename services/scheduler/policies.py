"""The scaling policies behind one interface, so the simulation, the planner and the live
scheduler run any of them: the hybrid controller and the baselines it is measured against."""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Protocol

from disagfusion.protocol import STAGES
from services.scheduler.config import SchedulerSettings
from services.scheduler.controller import Controller, FleetState
from services.scheduler.feedback import Observation
from services.scheduler.pool import Allocation, Pool, fit_to_pool, per_stage


class Policy(Protocol):
    name: str

    def decide(self, obs: Observation, fleet: FleetState, pins: dict[str, int] | None = None) -> Allocation: ...


class Scheduled:
    """A fixed allocation per time span: ``static`` is one span; the oracle switches to the best
    static allocation of each phase when the phase begins."""

    def __init__(self, name: str, schedule: list[tuple[float, Allocation]]):
        self.name = name
        self._times = [t for t, _ in schedule]
        self._allocations = [a for _, a in schedule]

    def decide(self, obs: Observation, fleet: FleetState, pins: dict[str, int] | None = None) -> Allocation:
        return self._allocations[max(0, bisect.bisect_right(self._times, obs.t) - 1)]


class _WindowMax:
    """Per stage, the highest count wanted within the last ``window`` seconds: the HPA's
    scale-down stabilisation."""

    def __init__(self, window: float):
        self.window = window
        self._history: deque[tuple[float, dict[str, int]]] = deque()

    def __call__(self, now: float, wanted: dict[str, int]) -> dict[str, int]:
        self._history.append((now, wanted))
        while self._history[0][0] < now - self.window:
            self._history.popleft()
        return {s: max(w.get(s, 0) for _, w in self._history) for s in STAGES}


class LagOnly:
    """KEDA's JetStream scaler under the HPA: replicas = ceil((num_pending + num_ack_pending) /
    lagThreshold) per stage, clamped to min/max, with the HPA's default 300 s scale-down window.
    It does not know the pool; what does not fit is trimmed in proportion (pods left pending)."""

    name = "lag"

    def __init__(self, pool: Pool, settings: SchedulerSettings, downscale_window_s: float = 300.0):
        self.pool, self.settings = pool, settings
        self._stabilise = _WindowMax(downscale_window_s)

    def decide(self, obs: Observation, fleet: FleetState, pins: dict[str, int] | None = None) -> Allocation:
        s = self.settings
        wanted = {}
        for stage in STAGES:
            n = math.ceil(obs.stages[stage].backlog / s.lag_threshold)
            wanted[stage] = min(max(n, s.min_instances.get(stage, 0)), s.max_instances.get(stage, self.pool.total))
        return fit_to_pool({**self._stabilise(obs.t, wanted), **(pins or {})}, self.pool)


class Threshold:
    """The DisagFusion authors' autoscaler: per stage, one instance more when utilisation > 80%
    or more than 2 queued, one fewer when utilisation < 20% and the queue is empty, then a 30 s
    cooldown for that stage. It grows only into free slots."""

    name = "threshold"

    def __init__(self, pool: Pool, settings: SchedulerSettings, high: float = 0.8, low: float = 0.2, queue: int = 2):
        self.pool, self.settings = pool, settings
        self.high, self.low, self.queue = high, low, queue
        self._target: dict[str, int] | None = None
        self._last_change = {s: -math.inf for s in STAGES}

    def decide(self, obs: Observation, fleet: FleetState, pins: dict[str, int] | None = None) -> Allocation:
        s = self.settings
        if self._target is None:
            running, starting = per_stage(fleet.running), per_stage(fleet.starting)
            self._target = {st: running[st] + starting[st] for st in STAGES}
        for stage in STAGES:
            view = obs.stages[stage]
            if obs.t - self._last_change[stage] < s.threshold_cooldown_s:
                continue
            n = self._target[stage]
            if (view.utilisation > self.high or view.pending > self.queue) and sum(self._target.values()) < self.pool.total:
                self._target[stage] = min(n + 1, s.max_instances.get(stage, self.pool.total))
            elif view.utilisation < self.low and view.pending == 0:
                self._target[stage] = max(n - 1, s.min_instances.get(stage, 0))
            if self._target[stage] != n:
                self._last_change[stage] = obs.t
        return fit_to_pool({**self._target, **(pins or {})}, self.pool)


def make_policy(name: str, pool: Pool, settings: SchedulerSettings, static: Allocation | None = None) -> Policy:
    if name == "hybrid":
        return Controller(pool, settings, use_feedback=True)
    if name == "predictor":
        return Controller(pool, settings, use_feedback=False)
    if name == "lag":
        return LagOnly(pool, settings)
    if name == "threshold":
        return Threshold(pool, settings)
    if name == "static":
        if static is None:
            raise ValueError("the static policy needs an allocation")
        return Scheduled("static", [(0.0, static)])
    raise ValueError(f"unknown policy {name!r}")
