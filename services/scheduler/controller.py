"""The hybrid controller: each tick, predicted incoming work plus the backlog already in the
system (to be drained within a horizon) become desired instances per stage, placed on a
heterogeneous pool. Up at once, down only after a stabilisation window, pins win."""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from disagfusion.protocol import STAGES
from services.scheduler.config import SchedulerSettings
from services.scheduler.feedback import Observation
from services.scheduler.pool import Allocation, Pool, capacity, empty_allocation, per_class


@dataclass
class FleetState:
    """What runs now, as the actuator reports it."""

    running: Allocation = field(default_factory=empty_allocation)
    """Instances serving (pulling work)."""
    starting: Allocation = field(default_factory=empty_allocation)
    """Instances asked for that do not pull yet."""
    ready_in: dict[str, float] = field(default_factory=dict)
    """Per stage, seconds until the last starting instance pulls."""


class Controller:
    """``use_feedback=False`` is the predictor-only policy: arrivals' predicted cost alone."""

    def __init__(self, pool: Pool, settings: SchedulerSettings, use_feedback: bool = True):
        self.pool = pool
        self.settings = settings
        self.use_feedback = use_feedback
        self.name = "hybrid" if use_feedback else "predictor"
        self._history: deque[tuple[float, Allocation]] = deque()
        self._last: tuple[Allocation, dict[str, int]] | None = None

    def need(self, obs: Observation, fleet: FleetState) -> dict[str, float]:
        """Reference-device instances each stage needs."""
        s = self.settings
        needs = {}
        for stage in STAGES:
            arriving = obs.stages[stage].incoming_work
            need = arriving / s.target_utilisation
            if self.use_feedback:
                ready = capacity(fleet.running, self.pool, stage)
                # Work piles up at the current capacity until new instances pull: plan for it now.
                wait = fleet.ready_in.get(stage) or s.startup_s.get(stage, 0.0)
                queued = obs.waiting_work(stage, due=s.deadline_aware)
                backlog = queued + max(0.0, arriving - ready) * wait
                need += backlog / s.horizon_s
            needs[stage] = need
        return needs

    def place(self, needs: dict[str, float], pins: dict[str, int]) -> Allocation:
        """Pins first, then minimums, then instances to the stage furthest below its need (so the
        pool, when short, is shared in the ratio of need), each on the class best suited to it."""
        s = self.settings
        free = {c.name: c.count for c in self.pool.classes}
        allocation = empty_allocation()
        preference = {stage: self.pool.preference(stage) for stage in STAGES}
        ceiling = {stage: s.max_instances.get(stage, self.pool.total) for stage in STAGES}
        count = {stage: 0 for stage in STAGES}
        cap = {stage: 0.0 for stage in STAGES}

        def add(stage: str) -> bool:
            for c in preference[stage]:
                if free[c.name] > 0:
                    free[c.name] -= 1
                    allocation[stage][c.name] = allocation[stage].get(c.name, 0) + 1
                    count[stage] += 1
                    cap[stage] += c.speed_for(stage)
                    return True
            return False

        for stage, n in pins.items():
            for _ in range(n):
                add(stage)
        free_stages = [stage for stage in STAGES if stage not in pins]
        for stage in free_stages:
            while count[stage] < min(s.min_instances.get(stage, 0), ceiling[stage]) and add(stage):
                pass

        heap = [(cap[stage] / needs[stage], stage) for stage in free_stages if needs[stage] > 0]
        heapq.heapify(heap)
        while heap:
            r, stage = heapq.heappop(heap)
            if r >= 1.0 and not s.fill_pool:
                break
            if count[stage] >= ceiling[stage] or not add(stage):
                continue  # this stage cannot grow; the others still may
            heapq.heappush(heap, (cap[stage] / needs[stage], stage))
        return allocation

    def stabilise(self, now: float, raw: Allocation, pins: dict[str, int], fleet: FleetState) -> Allocation:
        """Hold each (stage, class) at the highest count wanted within the window, unless the
        pool is needed elsewhere: then stages above their current want give way first. The
        fleet found at the first tick counts as wanted then, so a restart does not shrink it."""
        window = self.settings.stabilisation_s
        if not self._history:
            found = empty_allocation()
            for part in (fleet.running, fleet.starting):
                for stage, by_class in part.items():
                    for name, n in by_class.items():
                        found[stage][name] = found[stage].get(name, 0) + n
            self._history.append((now, found))
        self._history.append((now, raw))
        while self._history and self._history[0][0] < now - window:
            self._history.popleft()
        held = empty_allocation()
        for stage in STAGES:
            if stage in pins:
                held[stage] = dict(raw[stage])
                continue
            for _, past in self._history:
                for name, n in past[stage].items():
                    held[stage][name] = max(held[stage].get(name, 0), n)
        used = per_class(held)
        for c in self.pool.classes:
            excess = used.get(c.name, 0) - c.count
            surplus = sorted(
                STAGES, key=lambda st: held[st].get(c.name, 0) - raw[st].get(c.name, 0), reverse=True
            )
            for stage in surplus:
                if excess <= 0:
                    break
                give = min(excess, held[stage].get(c.name, 0) - raw[stage].get(c.name, 0))
                if give > 0:
                    held[stage][c.name] -= give
                    excess -= give
        return {stage: {name: n for name, n in by.items() if n > 0} for stage, by in held.items()}

    def keep_or_change(self, needs: dict[str, float], raw: Allocation, pins: dict[str, int]) -> Allocation:
        """Hysteresis when the pool is full: keep the last decision unless the new placement serves
        the stage furthest below its need better by more than ``switch_margin``. Without it, needs
        that sit near a tie (arrival rates are noisy over a tick) flip an instance between two
        stages every tick, and every flip cancels the instance that was starting, so neither ever
        serves. The comparison is with what was decided (and deployed), not with the last raw
        placement: a raw placement the hysteresis kept out never served anyone."""
        last = self._last
        if last is None or last[1] != pins or not (self._fills_pool(last[0]) and self._fills_pool(raw)):
            return raw  # a placement that leaves slots free is driven by need alone (stabilise holds it)

        def served(allocation: Allocation) -> float:
            return min((capacity(allocation, self.pool, s) / n for s, n in needs.items() if n > 0), default=0.0)

        return last[0] if served(last[0]) >= (1.0 - self.settings.switch_margin) * served(raw) else raw

    def _fills_pool(self, allocation: Allocation) -> bool:
        return sum(per_class(allocation).values()) == self.pool.total

    def decide(self, obs: Observation, fleet: FleetState, pins: dict[str, int] | None = None) -> Allocation:
        pins = pins or {}
        needs = self.need(obs, fleet)
        raw = self.keep_or_change(needs, self.place(needs, pins), pins)
        decided = self.stabilise(obs.t, raw, pins, fleet)
        self._last = (decided, dict(pins))
        return decided

