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
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from disagfusion.config import Settings
from disagfusion.engram.cli import engram_app
from disagfusion.deployment import Deployment, DeploymentError, detect
from disagfusion.launcher import Launcher, LauncherError
from disagfusion.protocol import STAGES, JobSpec, ProgressEvent, Result

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


@app.command("scale")
def scale_services(
    replicas: Annotated[list[str], typer.Argument(help="SERVICE=COUNT pairs, e.g. dit=3 encoder=1")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    compose_file: ComposeFiles = [],
    project_name: ProjectName = None,
    env_file: EnvFiles = [],
) -> None:
    """Set the replicas of each named service, on the embedded stack or docker compose.
    Scaling down drains: a stopped replica finishes what it holds; nothing is lost."""
    deployment = _deployment(data_dir, compose_file, project_name, env_file)
    wanted = _parse_scales(replicas)
    with console.status(f"scaling {deployment.kind} deployment: {wanted}"):
        try:
            deployment.scale(wanted)
        except DeploymentError as exc:
            _fail(str(exc))
    console.print(", ".join(f"{name}: {count}" for name, count in deployment.running().items()))


@app.command()
def status(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    compose_file: ComposeFiles = [],
    project_name: ProjectName = None,
    env_file: EnvFiles = [],
) -> None:
    """Replicas and JetStream backlog per stage."""
    from disagfusion.status import stage_status

    deployment = _deployment(data_dir, compose_file, project_name, env_file)
    settings = deployment.client_settings()
    running = deployment.running()
    try:
        rows = asyncio.run(stage_status(settings))
    except Exception as exc:
        _fail(f"cannot read queue state from {settings.nats_url}: {exc}")
    table = Table("stage", "model", "replicas", "backlog", "in flight", "waiting pulls",
                  title=f"{deployment.kind} deployment, NATS {settings.nats_url}")
    for row in rows:
        table.add_row(
            row.stage, row.model, str(running.get(row.service, "-")), str(row.backlog), str(row.in_flight), str(row.waiting)
        )
    console.print(table)


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
    console.print(f"wrote preset {name} to {path}")


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
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    console.print(f"wrote {output} ({result.width}x{result.height}); {stages}")


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
                             "timings": result.timings}
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
    total = sum(split.values()) or 1.0
    console.print("mean stage time: " + ", ".join(f"{s} {t:.3f} s ({100 * t / total:.0f}%)" for s, t in split.items()))
