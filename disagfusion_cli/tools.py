"""The tool commands: ``profile`` a model's stages, ``plan`` a fleet in simulation, write a
preset with ``init-model``. The planner is the scheduler service's; the CLI sits above the
services, so it may use it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from disagfusion.config import ModelSettings, Settings
from disagfusion.cost import PREDICTOR_TERMS, load_profiles
from disagfusion.memory import fleet_memory
from disagfusion.models import PRESET_WRITERS, init_preset, model_family
from disagfusion.models.base import SpecError
from disagfusion.profiling import Grid, fit, load_stages, measure
from disagfusion.protocol import TimingSample, is_token
from disagfusion_cli.common import console, fail, progress, validation_message
from services.scheduler.config import SchedulerSettings
from services.scheduler.planner import PlanReport, StageDeployment
from services.scheduler.planner import plan as simulate_plan
from services.scheduler.pool import PlacementError, parse_pool
from services.scheduler.trace import read_trace


def plan(
    trace: Annotated[Path, typer.Option("--trace", "-t", exists=True, dir_okay=False, help="JSONL of {t, spec[, phase]}")],
    pool: Annotated[str, typer.Option(help='Device classes and counts, e.g. "h100:64,l4:256"')] = "slot:12",
    policy: Annotated[str, typer.Option(help="hybrid, predictor, lag, threshold or static")] = "hybrid",
    profiles: Annotated[list[Path] | None, typer.Option("--profile", help="Cost profile files or folders (default DF_PROFILES_DIR)")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    baseline: Annotated[str | None, typer.Option(help="Also serve the trace another way and compare: monolithic "
                                                      "(a whole pipeline per device, offloading where memory is short)")] = None,
) -> None:
    """Size a fleet for a trace: run it through the scheduler in a discrete-event simulation
    (simulated time, instances batching as this environment's stage settings say) and print
    what it would deploy and the throughput and latency to expect. Each stage is placed only on
    device classes with the memory it needs (weights from the model's files or its profile)."""
    jobs = read_trace(trace)
    loaded = list(load_profiles(profiles or [ModelSettings().profiles_dir]).values())
    try:
        report = simulate_plan(
            jobs,
            parse_pool(pool),
            loaded,
            SchedulerSettings(),
            pool_text=pool,
            policy=policy,
            memory=fleet_memory(sorted({entry.spec.model for entry in jobs}), loaded, Settings()),
            baseline=baseline,
        )
    except (PlacementError, ValueError) as exc:
        fail(str(exc))
    if json_output:
        typer.echo(report.model_dump_json(indent=2))
    else:
        print_report(report)


def print_report(report: PlanReport) -> None:
    console.print(
        f"[bold]Plan[/] for {report.jobs} jobs on pool [cyan]{report.pool}[/] with the "
        f"[cyan]{report.policy}[/] policy ({report.simulated_s:.0f} s simulated, {report.instance_starts} instance starts)"
    )
    deploy = Table("stage", "peak instances per class", "mean serving", "memory per instance", title="What it would deploy")
    for d in report.deployment:
        deploy.add_row(d.stage, ", ".join(f"{name}: {n}" for name, n in d.peak.items()) or "-", f"{d.mean:.1f}",
                       memory_cell(d, report.class_memory_gb))
    console.print(deploy)
    phases = Table("phase", "jobs", "done", "throughput (jobs/s)", "p50 (s)", "p95 (s)", "SLO met", title="What to expect")
    for p in [*report.phases, report.overall]:
        phases.add_row(p.phase, str(p.jobs), str(p.completed), f"{p.throughput:.3g}", f"{p.p50_s:.3g}", f"{p.p95_s:.3g}", f"{p.slo:.0%}")
    console.print(phases)
    if report.baseline is not None:
        base = report.baseline
        compare = Table("mode", "throughput (jobs/s)", "p50 (s)", "p95 (s)", "offloads",
                        title=f"Against the {base.mode} baseline (same trace, same pool, simulated)")
        compare.add_row("disaggregated", f"{report.overall.throughput:.3g}", f"{report.overall.p50_s:.3g}",
                        f"{report.overall.p95_s:.3g}", "none: stages only where they fit")
        compare.add_row(base.mode, f"{base.overall.throughput:.3g}", f"{base.overall.p50_s:.3g}", f"{base.overall.p95_s:.3g}",
                        ", ".join(f"{name}: {'+'.join(stages)}" for name, stages in base.offloaded.items() if stages) or "none")
        console.print(compare)
        console.print(f"throughput {base.throughput_ratio:.2f}x the {base.mode} baseline's; p95 latency "
                      f"{base.p95_ratio:.2f}x lower")
    errors = Table("model/stage", "predictor error (running)", title="Predictor")
    for key, error in report.predictor_error.items():
        errors.add_row(key, "-" if error is None else f"{error:.1%}")
    console.print(errors)


def memory_cell(deployment: StageDeployment, class_memory_gb: dict[str, float | None]) -> str:
    """``33.6 GB (wan-14b) of h100 80 GB``: what one instance needs and the classes it is on."""
    if deployment.memory_gb is None:
        return "not known"
    on = ", ".join(f"{name} {class_memory_gb[name]:g} GB" if class_memory_gb.get(name) else f"{name} (size not given)"
                   for name in deployment.peak)
    return f"{deployment.memory_gb:.1f} GB ({deployment.memory_model})" + (f" of {on}" if on else "")


def _grid_option(field: str, what: str) -> object:
    return typer.Option(help=f"{what}, comma-separated (default {Grid().text(field)}).", show_default=False)


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

    if not is_token(model):  # it names subjects and consumers, as every job's model does
        fail(f"model name {model!r} is not 1-64 letters, digits, '_' or '-' (a NATS subject token): "
             "rename its directory in the models dir")
    given = dict(sizes=sizes, steps=steps, guidance=guidance, prompt_chars=prompt_chars, frames=frames, batches=batches)
    try:
        grid = Grid(**{name: value for name, value in given.items() if value is not None})
    except ValidationError as exc:
        fail(f"--{validation_message(exc).replace('_', '-')}")
    settings = Settings() if models_dir is None else Settings(models_dir=models_dir)
    if threads or settings.torch_threads:
        torch.set_num_threads(threads or settings.torch_threads)
    for library in (diffusers_logging, transformers_logging):  # their load-time bars would break rich's progress
        library.set_verbosity_error()
        library.disable_progress_bar()
    try:
        with console.status(f"loading the stages of {model} from {settings.models_dir}"):
            models = load_stages(model, settings)
        with progress() as bars:
            bar = bars.add_task(f"profiling {model}", total=grid.measurements(model))

            def on_sample(sample: TimingSample) -> None:
                job = sample.jobs[0]
                bars.update(bar, advance=1, description=(
                    f"{sample.stage} {job.megapixel_frames:.3g} MP {job.steps} steps{' guided' if job.guided else ''} "
                    f"batch {sample.batch}: {sample.seconds * 1e3:.1f} ms"))

            measurement = measure(model, settings, grid, runs, on_sample, models)
    except SpecError as exc:
        fail(str(exc))
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


def init_model(
    name: Annotated[str, typer.Argument(help=f"Preset to write: {', '.join(PRESET_WRITERS)}.")],
    directory: Annotated[Path, typer.Argument(help="Where to write the model directory.")],
) -> None:
    """Write a built-in preset: a diffusers directory with seeded weights (tiny and small are
    PixArt-Sigma; each <family>-tiny preset a tiny model of another family), or an emulated
    accelerator with its cost profile (emulated, emulated-video). No download."""
    if name not in PRESET_WRITERS:
        fail(f"unknown preset {name!r}; presets: {', '.join(PRESET_WRITERS)}")
    if directory.exists():
        fail(f"{directory} exists; init-model writes a new directory")
    path = init_preset(name, directory)
    family = model_family(path)
    weights = ", ".join(f"{stage} {size / 1e6:.2f} MB" for stage, size in family.weight_bytes(path).items())
    console.print(f"wrote preset {name} ({family.name}) to {path}; weights per stage: {weights}", soft_wrap=True)
