"""The stack commands: ``up``, ``down``, ``scale`` and ``status``, on the embedded stack or a
docker compose deployment."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel
from rich.live import Live
from rich.table import Table

from disagfusion.credentials import redact
from disagfusion import bus
from disagfusion.config import Settings
from disagfusion.deployment import Deployment, DeploymentError, LocalDeployment, detect
from disagfusion.launcher import Launcher, LauncherError
from disagfusion.protocol import STAGE_SERVICES, SchedulerStatus
from disagfusion.scheduler_state import read_status, update_pins
from disagfusion.status import StageStatus, stage_status
from disagfusion_cli.common import DEFAULT_DATA_DIR, DataDir, console, fail, parse_scales


def up(
    scale: Annotated[list[str], typer.Option(help="SERVICE=COUNT, e.g. --scale dit=2")] = [],
    monolithic: Annotated[bool, typer.Option(help="Run every stage of a job in one process (the pipeline "
                                             "service) instead of the encoder, dit and decoder.")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    gateway_port: Annotated[int, typer.Option(envvar="DF_GATEWAY_PORT",
                                              help="The gateway's port, when free (else any free one).")] = 8000,
    tenant: Annotated[list[str], typer.Option(help="A tenant's NATS user (repeat for more): it reads only its own "
                                              "jobs; its password is in <data dir>/credentials.json")] = [],
) -> None:
    """Start nats-server, redis-server and the services of compose.yaml as local processes."""
    launcher = Launcher(data_dir, gateway_port=gateway_port, monolithic=monolithic)
    try:
        with console.status("starting the stack (models are created on first use)"):
            state = launcher.up(parse_scales(scale), tenants=tenant)
    except (LauncherError, ValueError) as exc:
        fail(str(exc))
    console.print(f"stack up: NATS {state.nats_url}, Redis {state.redis_url}, logs in {data_dir / 'logs'}")
    for name, procs in state.services.items():
        console.print(f"  {name}: {len(procs)} process(es)")
    if state.gateway_url:
        console.print(f"gateway (OpenAI API): {state.gateway_url}/v1")
    if state.tenants:
        console.print(f"tenants: {', '.join(state.tenants)} (NATS users; passwords in {data_dir / 'credentials.json'})")
    _print_metrics(state.metrics_urls)


def _print_metrics(urls: dict[str, list[str]]) -> None:
    for name, found in urls.items():
        console.print(f"  {name} metrics: {' '.join(found)}")


def down(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Drain and stop the embedded stack."""
    launcher = Launcher(data_dir)
    if launcher.state() is None:
        console.print("no stack is running")
        return
    with console.status("draining services"):
        launcher.down()
    console.print("stack down")


ComposeFiles = Annotated[
    list[Path], typer.Option("--compose-file", "-f", help="Compose files of a docker compose deployment.")
]
ProjectName = Annotated[str | None, typer.Option("--project-name", "-p", help="Its compose project name.")]
EnvFiles = Annotated[list[Path], typer.Option("--env-file", help="Its compose env files (variables of compose.yaml).")]


def _deployment(data_dir: Path, compose_files: list[Path], project: str | None, env_files: list[Path]) -> Deployment:
    try:
        return detect(data_dir, compose_files or None, project, env_files)
    except DeploymentError as exc:
        fail(str(exc))


async def _scheduler(settings: Settings) -> SchedulerStatus | None:
    """The scheduler's published view, if one runs (it published within a few ticks)."""
    stack = await bus.connect(settings, "disagfusion-cli")
    try:
        status = await read_status(stack.js)
    finally:
        await stack.close()
    return status if status is not None and status.fresh() else None


async def _pin(settings: Settings, pin: dict[str, int], release: list[str] | None) -> dict[str, int]:
    stack = await bus.connect(settings, "disagfusion-cli")
    try:
        return await update_pins(stack.js, pin, release)
    finally:
        await stack.close()


def scale_services(
    replicas: Annotated[list[str], typer.Argument(help="SERVICE=COUNT pairs, e.g. dit=3 encoder=1; with --release, SERVICE names")] = [],
    release: Annotated[bool, typer.Option("--release", help="Hand the named services (all when none are named) back to the scheduler.")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    compose_file: ComposeFiles = [],
    project_name: ProjectName = None,
    env_file: EnvFiles = [],
) -> None:
    """Set the replicas of each named service, on the embedded stack or docker compose.
    Scaling down drains: a stopped replica finishes its batch and hands back the jobs it has not
    started; nothing is lost.
    While a scheduler runs, a stage service's count is pinned: the scheduler keeps it until
    ``disagfusion scale --release SERVICE`` (or ``--release`` for every pin)."""
    deployment = _deployment(data_dir, compose_file, project_name, env_file)
    settings = deployment.client_settings()
    scheduler = asyncio.run(_scheduler(settings))
    if release:
        if scheduler is None:
            fail("no scheduler is running, so there is no pin to release")
        pins = asyncio.run(_pin(settings, {}, replicas))
        console.print(f"released; pins now: {pins or 'none'}")
        return
    wanted = parse_scales(replicas)
    pinned = {name: n for name, n in wanted.items() if name in STAGE_SERVICES} if scheduler else {}
    if pinned:
        pins = asyncio.run(_pin(settings, pinned, None))
        console.print(f"pinned {pinned} (the {scheduler.policy} scheduler keeps them until --release); pins now: {pins}")
    direct = {name: n for name, n in wanted.items() if name not in pinned or scheduler.actuator == "dry-run"}
    if not direct:
        console.print(f"the scheduler's {scheduler.actuator} actuator applies it within {scheduler.tick_s:g} s")
        return
    with console.status(f"scaling {deployment.kind} deployment: {direct}"):
        try:
            deployment.scale(direct)
        except DeploymentError as exc:
            fail(str(exc))
    console.print(", ".join(f"{name}: {count}" for name, count in deployment.running().items()))


class StatusReport(BaseModel):
    deployment: str
    nats_url: str
    running: dict[str, int]
    stages: list[StageStatus]
    scheduler: SchedulerStatus | None = None
    metrics: dict[str, list[str]] = {}
    """Each service process's metrics endpoint (the embedded stack's; compose's are in docs/metrics.md)."""
    given_up: dict[str, list[str]] = {}
    """The embedded stack's processes its supervisor no longer restarts, by service: why."""


def _status_report(deployment: Deployment) -> StatusReport:
    settings = deployment.client_settings()

    async def read() -> tuple[list[StageStatus], SchedulerStatus | None]:
        return await stage_status(settings), await _scheduler(settings)

    try:
        rows, scheduler = asyncio.run(read())
    except Exception as exc:
        fail(f"cannot read queue state from {redact(settings.nats_url)}: {exc}")
    state = deployment.launcher.state() if isinstance(deployment, LocalDeployment) else None
    return StatusReport(deployment=deployment.kind, nats_url=redact(settings.nats_url), running=deployment.running(),
                        stages=rows, scheduler=scheduler, metrics=state.metrics_urls if state else {},
                        given_up=state.given_up if state else {})


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _status_table(report: StatusReport) -> Table:
    scheduler = report.scheduler
    columns = ["stage", "model", "replicas", "backlog", "in flight", "waiting pulls"]
    if scheduler is not None:
        columns += ["desired", "arrivals/s", "done/s", "predicted s", "measured s", "predictor error"]
    title = f"{report.deployment} deployment, NATS {report.nats_url}"
    caption = None
    if scheduler is not None:
        caption = (f"scheduler: {scheduler.policy} policy, {scheduler.actuator} actuator, pool {scheduler.pool}; "
                   f"{scheduler.throughput:.3g} results/s, latency p50 {_seconds(scheduler.p50_s)} s, "
                   f"p95 {_seconds(scheduler.p95_s)} s; pins {scheduler.pins or 'none'}")
        if scheduler.last_error:
            caption += f"; last actuator error: {scheduler.last_error}"
    table = Table(*columns, title=title, caption=caption)
    views = {s.stage: s for s in scheduler.stages} if scheduler else {}
    for row in report.stages:
        cells = [row.stage, row.model, str(report.running.get(row.service, "-")), str(row.backlog), str(row.in_flight),
                 str(row.waiting)]
        if scheduler is not None:
            view = views.get(row.stage)
            cells += ["-"] * 6 if view is None else [
                f"{view.desired}{' (pinned)' if view.pinned else ''}", f"{view.arrival_rate:.3g}",
                f"{view.throughput:.3g}", _seconds(view.predicted_s), _seconds(view.measured_s),
                "-" if view.predictor_error is None else f"{view.predictor_error:.1%}",
            ]
        table.add_row(*cells)
    return table


def status(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    compose_file: ComposeFiles = [],
    project_name: ProjectName = None,
    env_file: EnvFiles = [],
    watch: Annotated[float | None, typer.Option("--watch", help="Redraw every this many seconds until Ctrl-C.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Replicas and JetStream backlog per stage, and the scheduler's view when one runs:
    instances desired vs running, arrivals and throughput, predicted vs measured service time,
    the predictor's running error and end-to-end latency."""
    deployment = _deployment(data_dir, compose_file, project_name, env_file)
    if json_output:
        typer.echo(_status_report(deployment).model_dump_json(indent=2))
        return
    if watch is None:
        report = _status_report(deployment)
        console.print(_status_table(report))
        _print_metrics(report.metrics)
        for name, reasons in report.given_up.items():
            for reason in reasons:
                console.print(f"{name}: given up: {reason}", style="red", markup=False)
        return
    with Live(_status_table(_status_report(deployment)), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(watch)
                live.update(_status_table(_status_report(deployment)), refresh=True)
        except KeyboardInterrupt:
            pass
