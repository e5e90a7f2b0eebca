"""The scheduler as a service, in an embedded stack of the emulated model (real nats-server,
redis-server and stage processes from compose.yaml, the scheduler under its compose profile)
scaling that stack through the local actuator."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from disagfusion_cli import app
from disagfusion.client import Client
from disagfusion.config import Settings
from disagfusion.launcher import Launcher
from disagfusion.protocol import JobSpec, Result, unpack
from disagfusion.protocol import SchedulerStatus
from disagfusion.scheduler_state import read_status
from services.scheduler.deploy_actuators import ComposeActuator
from services.scheduler.live import LatencyWindow, LiveScheduler, LiveSettings, build, fleet_of
from services.scheduler.pool import parse_pool

SCHEDULER_ENV = {
    "COMPOSE_PROFILES": "scheduler",
    "DF_MODELS": "emulated",
    "DF_SCHED_ACTUATOR": "local",
    "DF_SCHED_POOL": "slot:6",
    "DF_SCHED_TICK_S": "0.5",
    "DF_SCHED_HORIZON_S": "4",
    "DF_SCHED_FILL_POOL": "false",
    "DF_SCHED_STABILISATION_S": "4",
    "DF_SCHED_ARRIVAL_TAU_S": "3",
    "DF_SCHED_STARTUP_S": '{"encode": 1, "denoise": 1, "decode": 1}',
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    root = tmp_path_factory.mktemp("live")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SCHEDULER_ENV.items():
            mp.setenv(key, value)
        mp.delenv("DF_NATS_URL", raising=False)
        launcher = Launcher(root / "stack", models_dir=root / "models")
        try:
            launcher.up()
            yield launcher
        finally:
            launcher.down(timeout=30)


async def _status(launcher: Launcher) -> SchedulerStatus | None:
    nc = await nats.connect(launcher.client_settings().nats_url)
    try:
        return await read_status(nc.jetstream())
    finally:
        await nc.close()


def _desired(status: SchedulerStatus, stage: str) -> tuple[int, int]:
    view = next(s for s in status.stages if s.stage == stage)
    return view.desired, view.running


async def test_a_burst_scales_dit_up_and_every_job_gets_exactly_one_result(stack: Launcher) -> None:
    specs = [JobSpec(model="emulated", prompt=f"burst {i}", seed=i, steps=20, width=256, height=256, guidance=1.0)
             for i in range(60)]
    results: Counter[str] = Counter()
    nc = await nats.connect(stack.client_settings().nats_url)

    async def count(msg) -> None:
        results[unpack(Result, msg.data).job_id] += 1

    await nc.subscribe("df.results.>", cb=count)
    dit_seen = {"desired": 0, "running": 0}

    async def watch() -> None:
        js = nc.jetstream()
        while True:
            status = await read_status(js)
            if status is not None:
                desired, running = _desired(status, "denoise")
                dit_seen["desired"] = max(dit_seen["desired"], desired)
                dit_seen["running"] = max(dit_seen["running"], running, stack.running()["dit"])
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch())
    try:
        started = time.monotonic()
        async with Client(stack.client_settings()) as client:
            answers = [r async for r in client.run_many(specs, timeout=180)]
        print(f"burst of {len(specs)} served in {time.monotonic() - started:.1f} s, dit peak {dit_seen}")
        await asyncio.sleep(1.0)  # a duplicate result would arrive now
    finally:
        watcher.cancel()
        await nc.close()
    assert sorted(r.job_id for r in answers) == sorted(s.job_id for s in specs)
    assert all(r.status == "ok" for r in answers), [r.error for r in answers if r.status != "ok"]
    assert results == Counter({s.job_id: 1 for s in specs})  # every job once, none twice
    assert dit_seen["desired"] >= 2, dit_seen
    assert dit_seen["running"] >= 2, dit_seen  # the local actuator started them
    # Once the burst is served the scheduler gives the extra DiTs back (they drain).
    deadline = time.monotonic() + 60
    while (await _status(stack)).stages[1].desired > 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    while stack.running()["dit"] > 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert stack.running()["dit"] == 1, await _status(stack)


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def test_a_pin_wins_until_released_and_status_shows_desired_vs_running(stack: Launcher) -> None:
    runner = CliRunner()
    data_dir = ["--data-dir", str(stack.data_dir)]
    pinned = runner.invoke(app, ["scale", "dit=3", *data_dir])
    assert pinned.exit_code == 0, pinned.output
    assert "pinned" in pinned.output

    def status_json() -> dict:
        shown = runner.invoke(app, ["status", "--json", *data_dir])
        assert shown.exit_code == 0, shown.output
        return json.loads(shown.output)

    def dit_view() -> dict:
        return next(s for s in status_json()["scheduler"]["stages"] if s["service"] == "dit")

    _wait_for(lambda: dit_view()["running"] == 3)
    time.sleep(6)  # longer than the stabilisation window: an idle dit would be scaled down by now
    view = dit_view()
    assert (view["desired"], view["running"], view["pinned"]) == (3, 3, True)
    assert stack.running()["dit"] == 3
    [scheduler_metrics] = stack.state().metrics_urls["scheduler"]
    with urllib.request.urlopen(scheduler_metrics, timeout=10) as answer:
        samples = {(s.name, s.labels.get("stage") or s.labels.get("outcome")): s.value
                   for f in text_string_to_metric_families(answer.read().decode()) for s in f.samples}
    assert samples[("disagfusion_scheduler_desired_instances", "denoise")] == 3
    assert samples[("disagfusion_scheduler_running_instances", "denoise")] == 3
    assert samples[("disagfusion_scheduler_ticks_total", "ok")] > 0
    assert status_json()["scheduler"]["pins"] == {"dit": 3}

    released = runner.invoke(app, ["scale", "--release", "dit", *data_dir])
    assert released.exit_code == 0, released.output
    _wait_for(lambda: stack.running()["dit"] == 1)
    # The scheduler reports the fleet as it found it at its last tick.
    _wait_for(lambda: (dit_view()["desired"], dit_view()["running"]) == (1, 1))
    assert status_json()["scheduler"]["pins"] == {}


def test_a_stopped_scheduler_withdraws_its_status(stack: Launcher) -> None:
    """Else `disagfusion scale` would pin for it (a status stays fresh for 30 s) and nothing would
    apply the pin."""
    assert asyncio.run(_status(stack)) is not None
    stack.scale("scheduler", 0)  # SIGTERM, and wait for it to exit
    assert asyncio.run(_status(stack)) is None


def test_latency_window_keeps_recent_results_only() -> None:
    window = LatencyWindow(10.0)
    for i in range(20):
        window.add(Result(job_id=f"j{i}", status="ok", submitted_at=100.0 + i, finished_at=101.0 + i + i / 10))
    results, throughput, p50, p95 = window.summary(now=120.0)
    assert results == 11  # finished at 110 or later
    assert throughput == pytest.approx(1.1)
    assert (p50, p95) == (pytest.approx(2.4), pytest.approx(2.9))


def test_fleet_of_reads_workloads_per_class() -> None:
    pool = parse_pool("h100:4,l4:8")
    running = {"encoder-l4": 2, "dit-h100": 3, "decoder-l4": 1, "scheduler": 1}
    fleet = fleet_of(running, pool, "{service}-{device}")
    assert fleet == {"encode": {"l4": 2}, "denoise": {"h100": 3}, "decode": {"l4": 1}}


def test_compose_actuator_settings_are_comma_lists_under_the_compose_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """As deploy/compose.scheduler.yaml sets them: the project directory mounted somewhere, the
    files named relative to it (the variables' values here point at this checkout)."""
    root = Path(__file__).resolve().parents[2]
    for key, value in {
        "DF_SCHED_ACTUATOR": "compose",
        "DF_SCHED_COMPOSE_DIR": str(root),
        "DF_SCHED_COMPOSE_FILES": "compose.yaml, deploy/compose.hostnet.yaml",
        "DF_SCHED_COMPOSE_ENV_FILES": "deploy/stack.env",
        "DF_SCHED_COMPOSE_PROJECT": "shop",
    }.items():
        monkeypatch.setenv(key, value)
    actuator = build(LiveSettings(), Settings(models="tiny")).actuator
    assert isinstance(actuator, ComposeActuator)
    config = actuator.deployment.docker.client_config
    assert [Path(f) for f in config.compose_files] == [root / "compose.yaml", root / "deploy" / "compose.hostnet.yaml"]
    assert [Path(f) for f in config.compose_env_files] == [root / "deploy" / "stack.env"]
    assert config.compose_project_name == "shop"


class _SlowDrain:
    """An actuator whose DiT scale-down drains until released, like a DiT holding video jobs."""

    def __init__(self) -> None:
        self.applied: list[dict[str, int]] = []
        self.drained = asyncio.Event()

    async def apply(self, desired: dict[str, int]) -> None:
        self.applied.append(desired)
        if desired.get("dit") == 1:
            await self.drained.wait()

    async def running(self) -> dict[str, int]:
        return {}


async def test_a_draining_workload_does_not_hold_back_another(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DF_MODELS", "emulated")
    actuator = _SlowDrain()
    scheduler = LiveScheduler(LiveSettings(pool="slot:12"), Settings(), actuator)
    running = {"encoder": 1, "dit": 8, "decoder": 3}
    scheduler.start_changes({"encoder": 1, "dit": 1, "decoder": 3}, running)
    await asyncio.sleep(0.05)
    scheduler.start_changes({"encoder": 7, "dit": 1, "decoder": 4}, running)  # the next tick
    await asyncio.sleep(0.05)
    assert actuator.applied == [{"dit": 1}, {"encoder": 7}, {"decoder": 4}]  # dit asked once, still draining
    actuator.drained.set()
    await asyncio.wait_for(scheduler.settle(), 5)
