"""The scheduler as a service: each tick it reads the queues (JetStream consumer info per stage),
folds in what it heard since the last tick (tasks entering stage queues on ``df.work.>``,
timing samples on ``df.metrics.>``, results on ``df.results.>``, all core subscriptions, which
JetStream's published messages reach too), asks its policy for an allocation, applies it
through an actuator and publishes its view to the ``DF_SCHEDULER`` KV bucket. Operator pins
(``disagfusion scale``) in the same bucket win until released."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from pydantic import AliasChoices, BeforeValidator, Field
from pydantic_settings import NoDecode

from disagfusion import bus, metrics
from disagfusion.config import Settings, comma_list
from disagfusion.cost import CostProfile, load_profiles
from disagfusion.memory import fleet_memory
from disagfusion.health import health_path, write_health
from disagfusion.models import carried_profile
from disagfusion.protocol import (
    STAGES,
    WORK_STREAM,
    DecodeError,
    Result,
    SchedulerStatus,
    Stage,
    StageState,
    StageTask,
    TimingSample,
    consumer_name,
    unpack,
)
from disagfusion.scheduler_state import read_pins, scheduler_bucket, withdraw_status, write_status
from services.scheduler.actuators import Actuator
from services.scheduler.config import SchedulerSettings
from services.scheduler.controller import FleetState
from services.scheduler.deploy_actuators import make_actuator
from services.scheduler.feedback import Feedback, Observation
from services.scheduler.policies import Policy, make_policy
from services.scheduler.pool import Allocation, Pool, deployment_replicas, empty_allocation, parse_pool, per_stage
from services.scheduler.predictor import Predictor

log = logging.getLogger(__name__)


CommaPaths = Annotated[list[Path], NoDecode, BeforeValidator(comma_list)]
"""Paths given as one comma-separated variable (NoDecode: not as JSON)."""


class LiveSettings(SchedulerSettings):
    stack_dir: Path = Field(default=Path(".df"), validation_alias=AliasChoices("DF_SCHED_STACK_DIR", "DF_STACK_DIR"))
    """The embedded stack the local actuator scales (the launcher sets DF_STACK_DIR)."""
    compose_files: CommaPaths = Field(default_factory=lambda: [Path("compose.yaml")])
    """The compose actuator's ``-f`` files, comma-separated, relative to ``compose_dir``."""
    compose_env_files: CommaPaths = Field(default_factory=list)
    """Its ``--env-file`` files, comma-separated, relative to ``compose_dir``."""
    compose_dir: Path = Path(".")
    """Where the compose files are: the project directory, which deploy/compose.scheduler.yaml
    mounts into the scheduler's container."""
    compose_project: str | None = None
    latency_window_s: float = Field(default=120.0, gt=0)
    """Results this recent make the published throughput and latency percentiles."""


@dataclass
class _Counts:
    """Consumer counts summed over the models of one stage."""

    num_pending: int = 0
    num_ack_pending: int = 0
    num_waiting: int = 0


class LatencyWindow:
    def __init__(self, window_s: float):
        self.window_s = window_s
        self._results: deque[tuple[float, float]] = deque()

    def add(self, result: Result) -> None:
        if result.submitted_at is not None:
            self._results.append((result.finished_at, result.finished_at - result.submitted_at))

    def summary(self, now: float) -> tuple[int, float, float | None, float | None]:
        """(results, results per second, p50, p95) over the window."""
        while self._results and self._results[0][0] < now - self.window_s:
            self._results.popleft()
        latencies = sorted(latency for _, latency in self._results)
        if not latencies:
            return 0, 0.0, None, None

        def quantile(q: float) -> float:
            return latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))]

        return len(latencies), len(latencies) / self.window_s, quantile(0.5), quantile(0.95)


def starting_profiles(runtime: Settings) -> list[CostProfile]:
    """What the predictor starts from: every profile in DF_PROFILES_DIR, and for each served
    model that none of them is for, the profile its model directory carries (the emulated
    family's), so an emulated fleet is predicted from the times its stages emulate."""
    profiles = list(load_profiles([runtime.profiles_dir]).values())
    known = {profile.model for profile in profiles}
    carried = (carried_profile(model, runtime) for model in runtime.model_names if model not in known)
    return profiles + [profile for profile in carried if profile is not None]


def workload_names(allocation: Allocation, pool: Pool, template: str) -> dict[str, int]:
    """Replicas per workload the actuator knows: compose services, or Deployments per class."""
    return deployment_replicas(allocation, pool, template)


def fleet_of(running: dict[str, int], pool: Pool, template: str) -> Allocation:
    """The actuator's running workloads as an allocation (stage → class → instances)."""
    allocation = empty_allocation()
    for stage in STAGES:
        for c in pool.classes:
            if stage in c.stages:
                name = template.format(service=stage.service, device=c.name, stage=stage)
                if running.get(name):
                    allocation[stage][c.name] = running[name]
    return allocation


class LiveScheduler:
    def __init__(self, settings: LiveSettings, runtime: Settings, actuator: Actuator, policy: Policy | None = None):
        self.settings, self.runtime, self.actuator = settings, runtime, actuator
        self.models = runtime.model_names
        profiles = starting_profiles(runtime)
        # Each stage only on the classes its largest served model fits (PlacementError if none).
        self.pool = parse_pool(settings.pool).fitted(fleet_memory(self.models, profiles, runtime))
        self.predictor = Predictor(profiles)
        self.feedback = Feedback(self.predictor, settings.arrival_tau_s, settings.horizon_s, settings.latency_budget)
        self.latency = LatencyWindow(settings.latency_window_s)
        self.policy = policy
        # Single-class pools name workloads by service alone: compose services, local processes.
        self.template = settings.k8s_deployment if len(self.pool.classes) > 1 else "{service}"
        self._applying: dict[str, asyncio.Task] = {}
        """Per workload, the change being made to it."""
        self._last_error: str | None = None
        self._unknown_models: set[str] = set()

    # ------------------------------------------------------------------ what it hears

    def on_task(self, msg: Msg) -> None:
        try:
            task = unpack(StageTask, msg.data)
        except DecodeError:
            return  # the stage answers a bad task with an error result; nothing to plan for
        try:
            self.feedback.on_enqueue(task.stage, task.job)
        except KeyError:
            if task.job.model not in self._unknown_models:
                self._unknown_models.add(task.job.model)
                log.warning("no cost profile for model %s: its arrivals are not predicted", task.job.model)

    def on_sample(self, msg: Msg) -> None:
        try:
            sample = unpack(TimingSample, msg.data)
        except DecodeError:
            return
        self.feedback.on_sample(sample)
        try:
            self.predictor.observe(sample)
        except KeyError:
            pass  # no profile: on_task said so once

    def on_result(self, msg: Msg) -> None:
        try:
            self.latency.add(unpack(Result, msg.data))
        except DecodeError:
            pass

    # ------------------------------------------------------------------ each tick

    async def consumer_counts(self, js) -> None:
        for stage in STAGES:
            total, found = _Counts(), False
            for model in self.models:
                try:
                    info = await js.consumer_info(WORK_STREAM, consumer_name(stage, model))
                except NotFoundError:
                    continue  # no worker of this stage has started yet
                found = True
                total.num_pending += info.num_pending
                total.num_ack_pending += info.num_ack_pending
                total.num_waiting += info.num_waiting
            if found:
                self.feedback.on_consumer_info(stage, total)

    def _initial_policy(self, fleet: FleetState) -> Policy:
        static = fleet.running if any(per_stage(fleet.running).values()) else None
        if self.settings.policy == "static" and static is None:
            static = {s: {self.pool.classes[0].name: self.settings.min_instances.get(s, 1)} for s in STAGES}
        return make_policy(self.settings.policy, self.pool, self.settings, static)

    async def tick(self, js, kv) -> SchedulerStatus:
        now = time.time()
        running = await self.actuator.running()
        fleet = FleetState(running=fleet_of(running, self.pool, self.template))
        await self.consumer_counts(js)
        obs = self.feedback.snapshot(now, per_stage(fleet.running))
        pins = await read_pins(kv)
        stage_pins = {stage: n for s, n in pins.items() if (stage := Stage.of_service(s)) is not None}
        if self.policy is None:
            self.policy = self._initial_policy(fleet)
        allocation = self.policy.decide(obs, fleet, stage_pins)
        desired = workload_names(allocation, self.pool, self.template)
        self.start_changes(desired, running)
        status = self.status(now, obs, allocation, running, pins)
        metrics.scheduler_view(status.stages)
        await write_status(kv, status)
        return status

    def start_changes(self, desired: dict[str, int], running: dict[str, int]) -> None:
        """One change at a time per workload (a scale-up waits for health, a scale-down drains,
        both longer than a tick; the next tick decides again from what then runs), but workloads
        change independently: a DiT draining its long video jobs must not hold back the encoders
        a new phase needs."""
        for name, n in desired.items():
            busy = self._applying.get(name)
            if n != running.get(name, 0) and (busy is None or busy.done()):
                metrics.SCHEDULER_CHANGES.labels(name, "up" if n > running.get(name, 0) else "down").inc()
                self._applying[name] = asyncio.create_task(self._apply({name: n}))

    async def settle(self) -> None:
        """Wait for every change under way."""
        await asyncio.gather(*self._applying.values())

    async def _apply(self, desired: dict[str, int]) -> None:
        try:
            await self.actuator.apply(desired)
            self._last_error = None
        except Exception as exc:  # the deployment refused; keep scheduling and say so
            log.exception("actuator failed to apply %s", desired)
            self._last_error = f"{type(exc).__name__}: {exc}"

    def status(self, now: float, obs: Observation, allocation: Allocation, running: dict[str, int], pins: dict[str, int]) -> SchedulerStatus:
        errors: dict[str, list[float]] = {}
        for e in self.predictor.errors():
            if e.rel_error is not None:
                errors.setdefault(e.stage, []).append(e.rel_error)
        wanted = per_stage(allocation)
        serving = per_stage(fleet_of(running, self.pool, self.template))
        stages = []
        for stage in STAGES:
            view = obs.stages[stage]
            stage_errors = errors.get(stage)
            stages.append(
                StageState(
                    stage=stage,
                    service=stage.service,
                    desired=wanted[stage],
                    running=serving[stage],
                    backlog=view.backlog,
                    in_flight=view.in_flight,
                    waiting=view.waiting,
                    arrival_rate=view.arrival_rate,
                    throughput=view.throughput,
                    predicted_s=view.predicted_s,
                    measured_s=view.measured_s,
                    predictor_error=sum(stage_errors) / len(stage_errors) if stage_errors else None,
                    pinned=stage.service in pins,
                )
            )
        results, throughput, p50, p95 = self.latency.summary(now)
        return SchedulerStatus(
            t=now,
            policy=self.settings.policy,
            actuator=self.settings.actuator,
            pool=self.settings.pool,
            tick_s=self.settings.tick_s,
            stages=stages,
            pins=pins,
            results=results,
            throughput=throughput,
            p50_s=p50,
            p95_s=p95,
            last_error=self._last_error,
        )

    # ------------------------------------------------------------------ the service

    async def run(self, stop: asyncio.Event) -> None:
        stack = await bus.connect(self.runtime, "disagfusion-scheduler")
        try:
            await stack.nc.subscribe("df.work.>", cb=_sync(self.on_task))
            await stack.nc.subscribe("df.metrics.>", cb=_sync(self.on_sample))
            await stack.nc.subscribe("df.results.>", cb=_sync(self.on_result))
            kv = await scheduler_bucket(stack.js, create=True)
            health = health_path()
            while not stop.is_set():
                write_health(health, "scheduling")
                try:
                    await self.tick(stack.js, kv)
                    metrics.SCHEDULER_TICKS.labels("ok").inc()
                except Exception:  # a NATS hiccup must not end the service; the next tick retries
                    log.exception("scheduler tick failed")
                    metrics.SCHEDULER_TICKS.labels("error").inc()
                try:
                    await asyncio.wait_for(stop.wait(), self.settings.tick_s)
                except TimeoutError:
                    pass
            await self.settle()  # let started scale-downs finish draining
            # Gone, not merely quiet: `disagfusion scale` must not leave a pin for a scheduler
            # that stopped (it takes a recent status for a running scheduler). Best effort: with
            # NATS already gone the status goes stale on its own.
            try:
                await withdraw_status(kv)
            except Exception:
                log.warning("could not withdraw the scheduler's status", exc_info=True)
        finally:
            await stack.close()


def _sync(handler):
    async def callback(msg: Msg) -> None:
        handler(msg)

    return callback


def build(settings: LiveSettings | None = None, runtime: Settings | None = None) -> LiveScheduler:
    settings = settings or LiveSettings()
    runtime = runtime or Settings()
    actuator = make_actuator(
        settings.actuator,
        data_dir=settings.stack_dir,
        compose_files=[settings.compose_dir / path for path in settings.compose_files],
        compose_env_files=[settings.compose_dir / path for path in settings.compose_env_files],
        project=settings.compose_project,
        namespace=settings.k8s_namespace,
    )
    return LiveScheduler(settings, runtime, actuator)
