"""A discrete-event simulation of the three-stage pipeline, in simulated time (no sleeping):
per-stage queues, instances on device classes that start up before they pull, batches whose
service time comes from a cost profile, instances that drain (finish their batch) when scaled
down, and a scheduler tick that runs the very same Feedback, Predictor and Policy code the
live scheduler runs. Instances batch and fetch ahead by the live stage worker's own rules
(``disagfusion.worker.policy``), with limits from the same settings a deployment gives it."""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from disagfusion.config import WorkerSettings
from disagfusion.cost import JobWork, cost_key, sampled
from disagfusion.protocol import STAGES, JobSpec, Stage, TimingSample
from disagfusion.worker import policy
from disagfusion.worker.policy import BatchKey, WorkerLimits
from services.scheduler.config import SchedulerSettings
from services.scheduler.controller import FleetState
from services.scheduler.feedback import Feedback
from services.scheduler.policies import Policy
from services.scheduler.pool import Allocation, DeviceClass, Pool, empty_allocation
from services.scheduler.predictor import Predictor
from services.scheduler.trace import TraceEntry


@dataclass(frozen=True)
class StageWorkers:
    """How the instances of one stage take work: the live worker's limits, and which jobs may
    share a batch (the rule the stage's service supplies)."""

    limits: WorkerLimits
    batch_key: BatchKey


BATCH_KEYS: dict[str, BatchKey] = {Stage.ENCODE: policy.by_model, Stage.DENOISE: policy.by_shape, Stage.DECODE: policy.by_shape}
"""The batch rule each stage service supplies: services/encoder's ``EncoderWorker.batch_key``;
the dit and the decoder keep the worker's."""


def deployed_workers(settings: WorkerSettings | Mapping[str, WorkerSettings] | None = None) -> dict[str, StageWorkers]:
    """Each stage's instances as a deployment with these worker settings runs them: one
    ``WorkerSettings`` for every stage, or one per stage (as compose sets ``DF_MAX_BATCH`` per
    service); by default the settings of this process's environment."""
    settings = WorkerSettings() if settings is None else settings
    per_stage = settings if isinstance(settings, Mapping) else dict.fromkeys(STAGES, settings)
    return {stage: StageWorkers(WorkerLimits.of(per_stage[stage]), BATCH_KEYS[stage]) for stage in STAGES}


@dataclass(frozen=True)
class SharedStartup:
    """Start-up that competes for one host's CPU, as on the emulated fleet of bench/elastic.py
    where every stage process starts on one machine and spends its start-up importing torch:
    one instance alone is ready after ``alone_s``; ``k`` starting at once share ``cores`` and are
    ready after ``k x cpu_s / cores``, whichever is longer. An accelerator fleet (an instance
    per device, weights loaded in parallel) has none of this and uses ``startup_s`` as is."""

    alone_s: float
    cpu_s: float
    cores: int

    def seconds(self, starting: int) -> float:
        return max(self.alone_s, starting * self.cpu_s / self.cores)


@dataclass
class JobRecord:
    spec: JobSpec
    arrived: float
    phase: str | None
    done: float = math.nan


@dataclass(eq=False)
class Instance:
    id: int
    stage: str
    device: DeviceClass
    ready_at: float
    starting: bool = True
    batch: list[JobRecord] = field(default_factory=list)
    batch_seconds: float = 0.0
    batch_ends: float = 0.0
    timed: set[tuple] = field(default_factory=set)
    """Cost keys of the jobs it has run: the live worker's estimates of what it holds."""
    last_taken: JobSpec | None = None
    """The last job it pulled: its next pull asks for a batch of jobs like it."""
    held: deque[JobRecord] = field(default_factory=deque)
    """Jobs it holds besides the batch running: fetched ahead, or carried from a pull whose
    other jobs did not share their batch."""
    draining: bool = False
    gone: bool = False


@dataclass
class TimelinePoint:
    t: float
    running: dict[str, int]
    desired: dict[str, int]


@dataclass
class SimResult:
    jobs: list[JobRecord]
    timeline: list[TimelinePoint]
    allocations: list[tuple[float, Allocation]]
    """The policy's decision at every tick."""
    end: float
    instance_starts: int
    redelivered: int
    """Jobs a dead instance held, redelivered after AckWait."""
    handed_back: int
    """Jobs a draining instance had fetched ahead and handed back unstarted."""


class Simulation:
    """``truth`` gives the service times (a separate Predictor, never refined; built from another
    profile it shows the scheduler learning). ``kills`` are (time, stage) instance deaths;
    ``pins`` are (time, {stage: n}) changes of the pinned counts (an empty dict releases)."""

    def __init__(
        self,
        trace: Sequence[TraceEntry],
        pool: Pool,
        policy: Policy,
        predictor: Predictor,
        settings: SchedulerSettings,
        truth: Predictor,
        initial: Allocation | None = None,
        workers: Mapping[str, StageWorkers] | None = None,
        noise: float = 0.05,
        seed: int = 0,
        kills: Sequence[tuple[float, str]] = (),
        pins: Sequence[tuple[float, dict[str, int]]] = (),
        redeliver_after_s: float = 30.0,
        max_time: float | None = None,
        observe: bool = True,
        shared_startup: SharedStartup | None = None,
    ):
        self.trace, self.pool, self.policy, self.settings = trace, pool, policy, settings
        self.predictor = predictor
        self.truth = truth
        self.workers = deployed_workers() if workers is None else workers
        """Per stage, the live worker's limits and batch rule: JetStream may hand a task to a
        busy instance's pull (one fetching ahead) while another instance idles; the task then
        waits behind the running batch, and a draining instance hands it back to the head of
        the queue."""
        self.noise, self.rng = noise, random.Random(seed)
        self.feedback = Feedback(predictor, settings.arrival_tau_s, settings.horizon_s, settings.latency_budget)
        self.redeliver_after_s = redeliver_after_s
        self.max_time = max_time
        self.shared_startup = shared_startup
        self.observe = observe
        """False for policies that ignore observations (static ones): the search for the oracle
        runs many simulations and need not feed the scheduler's predictor."""
        self._events: list[tuple[float, int, str, object]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self.queues: dict[str, deque[JobRecord]] = {s: deque() for s in STAGES}
        self.instances: list[Instance] = []
        self.idle: dict[str, list[Instance]] = {s: [] for s in STAGES}
        self.jobs: list[JobRecord] = []
        self.timeline: list[TimelinePoint] = []
        self.allocations: list[tuple[float, Allocation]] = []
        self.pins: dict[str, int] = {}
        self.instance_starts = 0
        self.redelivered = 0
        self.handed_back = 0
        self.now = 0.0
        self._truth_cache: dict[tuple, float] = {}
        for t, stage in kills:
            self._push(t, "kill", stage)
        for t, pinned in pins:
            self._push(t, "pin", pinned)
        self._apply(initial or empty_allocation(), startup=False)

    # -- events --------------------------------------------------------------------------

    def _push(self, t: float, kind: str, payload: object) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    def run(self) -> SimResult:
        arrivals = iter(self.trace)
        upcoming = next(arrivals, None)
        last_arrival = self.trace[-1].t if self.trace else 0.0
        self._push(0.0, "tick", None)
        while True:
            next_event = self._events[0][0] if self._events else math.inf
            if upcoming is not None and upcoming.t <= next_event:
                self.now = upcoming.t
                self._arrive(upcoming)
                upcoming = next(arrivals, None)
                continue
            if not self._events:
                break
            t, _, kind, payload = heapq.heappop(self._events)
            self.now = t
            if kind == "tick":
                self._tick()
                busy = upcoming is not None or any(self.queues.values()) or any(i.batch for i in self.instances)
                over = self.max_time is not None and t >= self.max_time
                if (busy or t < last_arrival) and not over:
                    self._push(t + self.settings.tick_s, "tick", None)
            elif kind == "fetch":
                self._dispatch(payload)  # type: ignore[arg-type]
            elif kind == "done":
                self._finish(payload)  # type: ignore[arg-type]
            elif kind == "ready":
                self._ready(payload)  # type: ignore[arg-type]
            elif kind == "redeliver":
                stage, records = payload  # type: ignore[misc]
                self._requeue(stage, records)
            elif kind == "kill":
                self._kill(payload)  # type: ignore[arg-type]
            elif kind == "pin":
                self.pins = dict(payload)  # type: ignore[arg-type]
        return SimResult(
            self.jobs, self.timeline, self.allocations, self.now, self.instance_starts, self.redelivered, self.handed_back
        )

    def _arrive(self, entry: TraceEntry) -> None:
        record = JobRecord(entry.spec, entry.t, entry.phase)
        self.jobs.append(record)
        self._enqueue(STAGES[0], record)

    def _enqueue(self, stage: str, record: JobRecord) -> None:
        self.queues[stage].append(record)
        if self.observe:
            self.feedback.on_enqueue(stage, record.spec)
        self._dispatch(stage)

    # -- instances -----------------------------------------------------------------------

    def _service_time(self, stage: str, batch: list[JobRecord], device: DeviceClass) -> float:
        specs = [r.spec for r in batch]
        key = (stage, specs[0].model, JobWork.of(specs[0]))
        base = self._truth_cache.get(key) if len(batch) == 1 else None
        if base is None:
            base = self.truth.predict(stage, specs)
            if len(batch) == 1:
                self._truth_cache[key] = base
        jitter = math.exp(self.rng.gauss(0.0, self.noise)) if self.noise else 1.0
        return base * jitter / device.speed_for(stage)

    def _pull(self, instance: Instance, sharers: int) -> list[JobRecord]:
        """What an idle instance's pull brings: the tasks at the head of the queue, as many as
        the worker asks for, the waiting ones shared among the idle instances' pulls."""
        queue = self.queues[instance.stage]
        asked = policy.pull_size(self.workers[instance.stage].limits, instance.last_taken)
        most = min(asked, max(1, math.ceil(len(queue) / sharers)))
        pulled = [queue.popleft() for _ in range(min(most, len(queue)))]
        instance.last_taken = pulled[-1].spec
        return pulled

    def _start(self, instance: Instance, jobs: list[JobRecord]) -> None:
        """Run the next batch of ``jobs`` (in the order the instance got them); it holds the
        others for the batches after."""
        workers = self.workers[instance.stage]
        instance.batch, rest = policy.split_batch(jobs, attrgetter("spec"), workers.batch_key, workers.limits)
        instance.held = deque(rest)
        instance.batch_seconds = self._service_time(instance.stage, instance.batch, instance.device)
        instance.batch_ends = self.now + instance.batch_seconds
        self._push(instance.batch_ends, "done", instance)
        ahead_s = workers.limits.fetch_ahead_s
        if workers.limits.holds and instance.batch_seconds > ahead_s:
            self._push(instance.batch_ends - ahead_s, "fetch", instance.stage)

    def _dispatch(self, stage: str) -> None:
        idle, queue = self.idle[stage], self.queues[stage]
        while queue:
            ahead = self._fetching_ahead(stage)
            # Idle instances and busy ones with room each have a pull waiting; JetStream serves one.
            if ahead and self.rng.randrange(len(idle) + len(ahead)) >= len(idle):
                taker = self.rng.choice(ahead)
                taker.held.append(queue.popleft())
                taker.last_taken = taker.held[-1].spec
            elif idle:
                instance = idle.pop()
                self._start(instance, self._pull(instance, len(idle) + 1))
            else:
                break

    def _fetching_ahead(self, stage: str) -> list[Instance]:
        """Busy instances of ``stage`` with a pull waiting for the job after theirs."""
        limits = self.workers[stage].limits
        # Without a fetch-ahead window a busy instance never has one: its work in hand is done
        # only once it idles. Skipping the scan keeps a 1,000-instance fleet fast.
        if not limits.holds or limits.fetch_ahead_s <= 0:
            return []
        return [
            i for i in self.instances
            if i.stage == stage and i.batch and len(i.held) < limits.holds and not (i.gone or i.draining)
            and i.batch_ends - self.now <= limits.fetch_ahead_s  # cheap: the rest of the batch alone is too long
            and policy.may_fetch_ahead(self._in_hand_s(i), limits)
        ]

    def _in_hand_s(self, instance: Instance) -> float:
        """What the live worker estimates is left in its hands: the rest of its running batch
        and the held jobs' service times; unknown (infinite) while it holds a shape it has not
        run yet."""
        stage, speed = instance.stage, instance.device.speed_for(instance.stage)

        def timed(spec: JobSpec) -> bool:
            return cost_key(stage, spec) in instance.timed

        def estimate(spec: JobSpec) -> float:
            return self.truth.predict(stage, [spec]) / speed if timed(spec) else math.inf

        running_left = instance.batch_ends - self.now if all(timed(r.spec) for r in instance.batch) else math.inf
        return policy.seconds_in_hand(running_left, (r.spec for r in instance.held), estimate)

    def _finish(self, instance: Instance) -> None:
        if instance.gone:
            return  # it died mid-batch; the batch was handed back
        batch, instance.batch = instance.batch, []
        instance.timed.update(cost_key(instance.stage, r.spec) for r in batch)
        if self.observe:
            self._report(instance, batch)
        following = Stage(instance.stage).next
        for record in batch:
            if following is None:
                record.done = self.now
            else:
                self._enqueue(following, record)
        if instance.held:
            self._start(instance, list(instance.held))
        elif instance.draining:
            instance.gone = True
            return
        else:
            self.idle[instance.stage].append(instance)
        self._dispatch(instance.stage)

    def _report(self, instance: Instance, batch: list[JobRecord]) -> None:
        """What a worker publishes on df.metrics.<stage>, handed to the scheduler's predictor."""
        sample = TimingSample.model_construct(
            stage=instance.stage,
            model=batch[0].spec.model,
            worker=f"sim-{instance.id}",
            batch=len(batch),
            seconds=instance.batch_seconds,
            jobs=[sampled(r.spec) for r in batch],
            t=self.now,
        )
        speed = instance.device.speed_for(instance.stage)
        self.predictor.observe(sample, speed)
        self.feedback.on_sample(sample, speed)

    def _ready(self, instance: Instance) -> None:
        if instance.gone:
            return
        instance.starting = False
        self.idle[instance.stage].append(instance)
        self._dispatch(instance.stage)

    def _kill(self, stage: str) -> None:
        """An instance dies: what it held goes back to the queue once JetStream's AckWait expires."""
        alive = [i for i in self.instances if i.stage == stage and not i.gone and not i.starting]
        if not alive:
            return
        victim = max(alive, key=lambda i: len(i.batch))
        victim.gone = True
        if victim in self.idle[stage]:
            self.idle[stage].remove(victim)
        lost = victim.batch + list(victim.held)
        victim.batch, victim.held = [], deque()
        if lost:
            self.redelivered += len(lost)
            self._push(self.now + self.redeliver_after_s, "redeliver", (stage, lost))

    # -- the scheduler tick ----------------------------------------------------------------

    def fleet(self) -> FleetState:
        running, starting = empty_allocation(), empty_allocation()
        ready_in: dict[str, float] = {}
        for i in self.instances:
            if i.gone or i.draining:
                continue
            target = starting if i.starting else running
            target[i.stage][i.device.name] = target[i.stage].get(i.device.name, 0) + 1
            if i.starting:
                ready_in[i.stage] = max(ready_in.get(i.stage, 0.0), i.ready_at - self.now)
        return FleetState(running, starting, ready_in)

    def _tick(self) -> None:
        self.instances = [i for i in self.instances if not i.gone]
        for stage in STAGES:
            in_flight = sum(len(i.batch) + len(i.held) for i in self.instances if i.stage == stage)
            # JetStream's num_waiting counts pulls, and a worker fetching ahead has one too.
            pulls = len(self.idle[stage]) + len(self._fetching_ahead(stage))
            self.feedback.on_consumer_info(stage, _Counts(len(self.queues[stage]), in_flight, pulls))
        fleet = self.fleet()
        running = {s: sum(fleet.running[s].values()) for s in STAGES}
        obs = self.feedback.snapshot(self.now, running)
        desired = self.policy.decide(obs, fleet, self.pins)
        self.allocations.append((self.now, desired))
        self._apply(desired, startup=True)
        self.timeline.append(
            TimelinePoint(self.now, running, {s: sum(desired.get(s, {}).values()) for s in STAGES})
        )

    def _startup_s(self, stage: str) -> float:
        if self.shared_startup is None:
            return self.settings.startup_s.get(stage, 0.0)
        starting = sum(1 for i in self.instances if i.starting and not i.gone)
        return self.shared_startup.seconds(starting + 1)

    def _apply(self, desired: Allocation, startup: bool) -> None:
        """Reconcile like a Deployment controller: start what is missing, drain what is extra
        (starting ones are cancelled first, then idle ones; busy ones finish their batch and
        hand back the jobs they fetched ahead, which the next pulls take before newer ones)."""
        for stage in STAGES:
            for c in self.pool.classes:
                want = desired.get(stage, {}).get(c.name, 0)
                mine = [i for i in self.instances if i.stage == stage and i.device.name == c.name and not i.gone and not i.draining]
                for _ in range(want - len(mine)):
                    wait = self._startup_s(stage) if startup else 0.0
                    instance = Instance(next(self._ids), stage, c, self.now + wait)
                    self.instances.append(instance)
                    self.instance_starts += 1
                    self._push(self.now + wait, "ready", instance)
                extra = len(mine) - want
                if extra <= 0:
                    continue
                order = sorted(mine, key=lambda i: (not i.starting, bool(i.batch), -i.ready_at))
                for instance in order[:extra]:
                    if instance.starting or not instance.batch:
                        instance.gone = True
                        if instance in self.idle[stage]:
                            self.idle[stage].remove(instance)
                    else:
                        instance.draining = True
                        self._hand_back(instance)

    def _hand_back(self, instance: Instance) -> None:
        if instance.held:
            self.handed_back += len(instance.held)
            self._requeue(instance.stage, instance.held)
            instance.held = deque()

    def _requeue(self, stage: str, records: Sequence[JobRecord]) -> None:
        """Put tasks back at the head of the queue, in order: JetStream redelivers before newer ones."""
        self.queues[stage].extendleft(reversed(records))
        self._dispatch(stage)


@dataclass
class _Counts:
    num_pending: int
    num_ack_pending: int
    num_waiting: int
