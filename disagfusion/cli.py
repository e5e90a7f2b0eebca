"""The ``disagfusion`` command: run the stack, send it work, look at it."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from disagfusion import bus
from disagfusion.config import Settings
from disagfusion.cost import PREDICTOR_TERMS
from disagfusion.engram.cli import engram_app
from disagfusion.deployment import Deployment, DeploymentError, detect
from disagfusion.launcher import Launcher, LauncherError
from disagfusion.models.base import SpecError
from disagfusion.profiling import Grid, fit, load_stages, measure
from disagfusion.protocol import STAGE_SERVICES, STAGES, JobSpec, ProgressEvent, Result, SchedulerStatus, TimingSample
from disagfusion.scheduler_state import read_status, update_pins
from disagfusion.status import StageStatus, stage_status

app = typer.Typer(help="DisagFusion: diffusion models served as a disaggregated pipeline.", no_args_is_help=True)
app.add_typer(engram_app, name="engram")
console = Console()

DataDir = Annotated[Path, typer.Option("--data-dir", help="Where the embedded stack keeps its state and logs.")]
DEFAULT_DATA_DIR = Path(".df")


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def _settings(data_dir: Path) -> Settings:
    """Settings from the environment; without DF_NATS_URL, talk to the embedded stack if one runs."""
    launcher = Launcher(data_dir)
    if "DF_NATS_URL" not in os.environ and launcher.state() is not None:
        return launcher.client_settings()
    return Settings()


def _parse_scales(pairs: list[str]) -> dict[str, int]:
    scales = {}
    for pair in pairs:
        service, _, count = pair.partition("=")
        if not count.isdigit():
            _fail(f"expected SERVICE=COUNT, got {pair!r}")
        scales[service] = int(count)
    return scales


def _parse_size(size: str) -> tuple[int, int]:
    width, _, height = size.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        _fail(f"--size must look like 256x256 (WIDTHxHEIGHT), got {size!r}")
    return int(width), int(height)


# --------------------------------------------------------------------- the stack


@app.command()
def up(
    scale: Annotated[list[str], typer.Option(help="SERVICE=COUNT, e.g. --scale dit=2")] = [],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Start nats-server, redis-server and the services of compose.yaml as local processes."""
    launcher = Launcher(data_dir)
    try:
        with console.status("starting the stack (models are created on first use)"):
            state = launcher.up(_parse_scales(scale))
    except LauncherError as exc:
        _fail(str(exc))
    console.print(f"stack up: NATS {state.nats_url}, Redis {state.redis_url}, logs in {data_dir / 'logs'}")
    for name, procs in state.services.items():
        console.print(f"  {name}: {len(procs)} process(es)")


@app.command()
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
        _fail(str(exc))


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


@app.command("scale")
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
            _fail("no scheduler is running, so there is no pin to release")
        pins = asyncio.run(_pin(settings, {}, replicas))
        console.print(f"released; pins now: {pins or 'none'}")
        return
    wanted = _parse_scales(replicas)
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
            _fail(str(exc))
    console.print(", ".join(f"{name}: {count}" for name, count in deployment.running().items()))


class StatusReport(BaseModel):
    deployment: str
    nats_url: str
    running: dict[str, int]
    stages: list[StageStatus]
    scheduler: SchedulerStatus | None = None


def _status_report(deployment: Deployment) -> StatusReport:
    settings = deployment.client_settings()

    async def read() -> tuple[list[StageStatus], SchedulerStatus | None]:
        return await stage_status(settings), await _scheduler(settings)

    try:
        rows, scheduler = asyncio.run(read())
    except Exception as exc:
        _fail(f"cannot read queue state from {settings.nats_url}: {exc}")
    return StatusReport(deployment=deployment.kind, nats_url=settings.nats_url, running=deployment.running(),
                        stages=rows, scheduler=scheduler)


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


@app.command()
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
        console.print(_status_table(_status_report(deployment)))
        return
    with Live(_status_table(_status_report(deployment)), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(watch)
                live.update(_status_table(_status_report(deployment)), refresh=True)
        except KeyboardInterrupt:
            pass


@app.command("plan", context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def plan(ctx: typer.Context) -> None:
    """Size a fleet for a trace by running the scheduler in simulation (``disagfusion plan
    --help`` lists the options: --trace, --pool, --policy, --profile, --json)."""
    # The planner belongs to the scheduler service; disagfusion/ must not import services/ at
    # import time, so it is loaded (and given the arguments) only when asked for.
    from services.scheduler.plan_cli import plan_command

    planner = typer.Typer(add_completion=False)
    planner.command()(plan_command)
    typer.main.get_command(planner)(ctx.args, prog_name="disagfusion plan", standalone_mode=True)


def _grid_option(field: str, what: str) -> object:
    return typer.Option(help=f"{what}, comma-separated (default {Grid().text(field)}).", show_default=False)


@app.command("profile")
def profile(
    model: Annotated[str, typer.Argument(help="Model to measure: a preset (tiny, small) or a directory in the models dir.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Profile to write (default MODEL-DEVICE.yaml in DF_PROFILES_DIR, deploy/profiles/ in the source tree).")] = None,
    models_dir: Annotated[Path | None, typer.Option("--models-dir", help="Where model directories live (default DF_MODELS_DIR).")] = None,
    sizes: Annotated[str | None, _grid_option("sizes", "Image sizes, SIDE (square) or WIDTHxHEIGHT")] = None,
    steps: Annotated[str | None, _grid_option("steps", "Denoising steps")] = None,
    guidance: Annotated[str | None, _grid_option("guidance", "Guidance scales (1: no classifier-free guidance)")] = None,
    prompt_chars: Annotated[str | None, _grid_option("prompt_chars", "Prompt lengths in characters")] = None,
    frames: Annotated[str | None, _grid_option("frames", "Frames per job (1 for images)")] = None,
    batches: Annotated[str | None, _grid_option("batches", "Batch sizes")] = None,
    runs: Annotated[int, typer.Option(min=1, help="Timed runs per grid point, after a warm-up; the fastest counts.")] = 3,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch CPU threads (default DF_TORCH_THREADS, else torch's choice).")] = None,
) -> None:
    """Measure MODEL's real stages on this machine over a grid of job shapes, fit the scheduler
    predictor's cost per stage, and write the cost profile the scheduler starts from."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    given = dict(sizes=sizes, steps=steps, guidance=guidance, prompt_chars=prompt_chars, frames=frames, batches=batches)
    try:
        grid = Grid(**{name: value for name, value in given.items() if value is not None})
    except ValidationError as exc:
        _fail(f"--{_validation_message(exc).replace('_', '-')}")
    settings = Settings() if models_dir is None else Settings(models_dir=models_dir)
    if threads or settings.torch_threads:
        torch.set_num_threads(threads or settings.torch_threads)
    for library in (diffusers_logging, transformers_logging):  # their load-time bars would break rich's progress
        library.set_verbosity_error()
        library.disable_progress_bar()
    try:
        with console.status(f"loading the stages of {model} from {settings.models_dir}"):
            models = load_stages(model, settings)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            bar = progress.add_task(f"profiling {model}", total=grid.measurements(model))

            def on_sample(sample: TimingSample) -> None:
                job = sample.jobs[0]
                progress.update(bar, advance=1, description=(
                    f"{sample.stage} {job.width}x{job.height} {job.steps} steps guidance {job.guidance:g} "
                    f"batch {sample.batch}: {sample.seconds * 1e3:.1f} ms"))

            measurement = measure(model, settings, grid, runs, on_sample, models)
    except SpecError as exc:
        _fail(str(exc))
    fitted = fit(measurement)
    path = out or settings.profiles_dir / f"{model}-{measurement.device_slug}.yaml"
    fitted.profile.save(path)
    table = Table("stage", "samples", "coefficients (s)", "median error", "max error",
                  title=f"{model} on {fitted.profile.hardware}, measured in {measurement.elapsed_s:.0f} s")
    for stage, samples in measurement.by_stage().items():
        cost = fitted.profile.stages[stage]
        table.add_row(stage, str(len(samples)), ", ".join(f"{term} {getattr(cost, term):.3g}" for term in PREDICTOR_TERMS[stage]),
                      f"{fitted.median_error[stage]:.1%}", f"{fitted.max_error[stage]:.1%}")
    console.print(table)
    console.print(f"wrote {path}", soft_wrap=True)  # a path the user may copy: never wrapped


@app.command("init-model")
def init_model(
    name: Annotated[str, typer.Argument(help="Preset to write: tiny, small, emulated or emulated-video.")],
    directory: Annotated[Path, typer.Argument(help="Where to write the model directory.")],
) -> None:
    """Write a built-in preset: a diffusers directory with seeded weights (tiny, small), or an
    emulated accelerator with its cost profile (emulated, emulated-video). No download."""
    from disagfusion.models import PRESET_WRITERS, init_preset

    if name not in PRESET_WRITERS:
        _fail(f"unknown preset {name!r}; presets: {', '.join(PRESET_WRITERS)}")
    path = init_preset(name, directory)
    console.print(f"wrote preset {name} to {path}", soft_wrap=True)


# --------------------------------------------------------------------- jobs


@app.command()
def generate(
    prompt: str,
    output: Annotated[Path, typer.Option("-o", "--output")] = Path("out.png"),
    model: str = "tiny",
    seed: int = 0,
    steps: int = 20,
    size: Annotated[str, typer.Option(help="WIDTHxHEIGHT")] = "256x256",
    guidance: float = 4.5,
    negative_prompt: str = "",
    timeout: float = 600.0,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Generate one image and write it to OUTPUT."""
    from disagfusion.client import Client

    width, height = _parse_size(size)
    try:
        spec = JobSpec(
            prompt=prompt, negative_prompt=negative_prompt, model=model, seed=seed, steps=steps,
            width=width, height=height, guidance=guidance,
        )
    except ValidationError as exc:
        _fail(_validation_message(exc))

    async def run() -> tuple[Result, bytes | None]:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            bar = progress.add_task("queued", total=steps)

            def on_event(event: ProgressEvent) -> None:
                if event.kind == "step":
                    progress.update(bar, completed=event.step, description="denoising")
                elif event.kind == "stage_started":
                    progress.update(bar, description=event.stage)

            async with Client(_settings(data_dir)) as client:
                result = await client.generate(spec, on_event, timeout)
                return result, (await client.output(result) if result.status == "ok" else None)

    result, data = asyncio.run(run())
    if result.status != "ok":
        _fail(f"job {result.job_id} failed at {result.stage}: {result.error}")
    output.write_bytes(data)
    stages = ", ".join(f"{k} {v:.2f}s{_batched(result.batch_sizes.get(k, 1))}" for k, v in result.timings.items())
    console.print(f"wrote {output} ({result.width}x{result.height}); {stages}", soft_wrap=True)


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"


def load_jobs(path: Path) -> list[JobSpec]:
    """One JobSpec per line (JSON); blank lines and lines starting with # are skipped."""
    specs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            specs.append(JobSpec.model_validate_json(line))
        except ValidationError as exc:
            _fail(f"{path}:{number}: {_validation_message(exc)}")
    return specs


@app.command()
def submit(
    jobs: Annotated[Path, typer.Argument(help="JSONL file, one job spec per line.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the images and manifest.json.")] = Path("out"),
    timeout: float = 600.0,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Submit a batch of jobs, write one PNG per job and a manifest with per-stage timings."""
    from disagfusion.client import Client

    specs = load_jobs(jobs)
    out.mkdir(parents=True, exist_ok=True)
    index = {spec.job_id: i for i, spec in enumerate(specs)}
    manifest: list[dict] = [{} for _ in specs]

    async def run() -> float:
        started = time.time()
        async with Client(_settings(data_dir)) as client:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console) as progress:
                bar = progress.add_task("generating", total=len(specs))
                async for result in client.run_many(specs, timeout):
                    i = index[result.job_id]
                    entry = {"job_id": result.job_id, "prompt": specs[i].prompt, "status": result.status,
                             "latency_s": result.finished_at - (result.submitted_at or started),
                             "timings": result.timings, "batch_sizes": result.batch_sizes}
                    if result.status == "ok":
                        name = f"{i:04d}-{result.job_id}.png"
                        (out / name).write_bytes(await client.output(result))
                        entry["file"] = name
                    else:
                        entry.update(error=result.error, field=result.field, stage=result.stage)
                    manifest[i] = entry
                    progress.advance(bar)
        return time.time() - started

    elapsed = asyncio.run(run())
    (out / "manifest.json").write_text(json.dumps({"elapsed_s": elapsed, "jobs": manifest}, indent=2))
    _print_summary(manifest, elapsed, out)


def _print_summary(manifest: list[dict], elapsed: float, out: Path) -> None:
    ok = [m for m in manifest if m["status"] == "ok"]
    console.print(f"{len(ok)}/{len(manifest)} images in {elapsed:.1f} s: {len(ok) / elapsed:.2f} images/s "
                  f"(manifest: {out / 'manifest.json'})")
    for failed in (m for m in manifest if m["status"] != "ok"):
        console.print(f"[red]failed[/red] {failed['job_id']}: {failed['error']}")
    if not ok:
        return
    latencies = sorted(m["latency_s"] for m in ok)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    console.print(f"latency p50 {statistics.median(latencies):.2f} s, p95 {p95:.2f} s")
    split = {stage: statistics.mean(m["timings"].get(stage, 0.0) for m in ok) for stage in STAGES}
    batches = {stage: statistics.mean(m["batch_sizes"].get(stage, 1) for m in ok) for stage in STAGES}
    total = sum(split.values()) or 1.0
    console.print("mean stage time per job: " + ", ".join(
        f"{s} {t:.3f} s ({100 * t / total:.0f}%, batches of {batches[s]:.3g})" for s, t in split.items()))


def _batched(size: int) -> str:
    return f" (batch of {size})" if size > 1 else ""
