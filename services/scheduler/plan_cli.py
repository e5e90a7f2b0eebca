"""``disagfusion plan``: size a fleet for a trace by running the scheduler in simulation.
The CLI mounts it with ``app.command("plan")(plan_command)``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from disagfusion.config import ModelSettings
from disagfusion.cost import load_profiles
from services.scheduler.config import SchedulerSettings
from services.scheduler.planner import PlanReport, plan
from services.scheduler.pool import parse_pool
from services.scheduler.trace import read_trace


def plan_command(
    trace: Annotated[Path, typer.Option("--trace", "-t", exists=True, dir_okay=False, help="JSONL of {t, spec[, phase]}")],
    pool: Annotated[str, typer.Option(help='Device classes and counts, e.g. "h100:64,l4:256"')] = "slot:12",
    policy: Annotated[str, typer.Option(help="hybrid, predictor, lag, threshold or static")] = "hybrid",
    profiles: Annotated[list[Path] | None, typer.Option("--profile", help="Cost profile files or folders (default DF_PROFILES_DIR)")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Run the trace through the scheduler in a discrete-event simulation (simulated time) and
    print what it would deploy and the throughput and latency to expect."""
    report = plan(
        read_trace(trace),
        parse_pool(pool),
        list(load_profiles(profiles or [ModelSettings().profiles_dir]).values()),
        SchedulerSettings(),
        pool_text=pool,
        policy=policy,
    )
    if json_output:
        typer.echo(report.model_dump_json(indent=2))
    else:
        print_report(report, Console())


def print_report(report: PlanReport, console: Console) -> None:
    console.print(
        f"[bold]Plan[/] for {report.jobs} jobs on pool [cyan]{report.pool}[/] with the "
        f"[cyan]{report.policy}[/] policy ({report.simulated_s:.0f} s simulated, {report.instance_starts} instance starts)"
    )
    deploy = Table("stage", "peak instances per class", "mean serving", title="What it would deploy")
    for d in report.deployment:
        deploy.add_row(d.stage, ", ".join(f"{name}: {n}" for name, n in d.peak.items()) or "-", f"{d.mean:.1f}")
    console.print(deploy)
    phases = Table("phase", "jobs", "done", "throughput (jobs/s)", "p50 (s)", "p95 (s)", "SLO met", title="What to expect")
    for p in [*report.phases, report.overall]:
        phases.add_row(p.phase, str(p.jobs), str(p.completed), f"{p.throughput:.3g}", f"{p.p50_s:.3g}", f"{p.p95_s:.3g}", f"{p.slo:.0%}")
    console.print(phases)
    errors = Table("model/stage", "predictor error (running)", title="Predictor")
    for key, error in report.predictor_error.items():
        errors.add_row(key, "-" if error is None else f"{error:.1%}")
    console.print(errors)
