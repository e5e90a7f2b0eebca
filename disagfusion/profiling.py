"""Measure a model's real stages on this machine over a grid of job shapes, and fit its cost profile.

``disagfusion profile`` runs this. Each stage is loaded the way the services load it
(``load_stage_model``) and run in this process on batches of jobs from a grid (sizes, steps,
guidance on/off, prompt lengths, frames, batch sizes). A stage is timed once per distinct shape
its cost depends on (the encoder does not care about the image size, the decoder not about the
prompt), taking the fastest of a few runs after a warm-up run: on a shared machine other load
only ever adds time. The output of one stage feeds the next, so every stage runs on real inputs.

The fit (``disagfusion.cost.fit_stage_cost``, non-negative least squares on the relative
error) keeps to the terms the scheduler's predictor refines (``disagfusion.cost.PREDICTOR_TERMS``):
per stage a per-batch constant plus work summed over the jobs (prompts and tokens at the
encoder, steps and step-megapixels at the DiT, jobs and megapixels at the decoder; guidance
doubles the encoder's and the DiT's work), with no batch discount and no quadratic term. The
result is a ``CostProfile`` of kind ``measured``, the file the predictor starts from.
"""

from __future__ import annotations

import itertools
import platform
import statistics
import time
from collections.abc import Callable, Hashable, Sequence
from datetime import UTC, datetime
from typing import Annotated

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveInt

from disagfusion.config import Settings, comma_list
from disagfusion.machine import describe
from disagfusion.models import load_stage_model, weight_bytes
from disagfusion.models.base import StageModel, Tensors
from disagfusion.cost import COEFFICIENTS, PREDICTOR_TERMS, CostProfile, StageCost, fit_stage_cost, sampled
from disagfusion.protocol import STAGES, JobSpec, TimingSample

PROMPT_TEXT = "a watercolour painting of a lighthouse on a cliff at dusk, seagulls over the waves, warm light; "
"""Prompts of the grid are this text repeated and cut to the length asked for."""

STRUCTURE: dict[str, StageCost] = {
    "encode": StageCost(cfg_factor=2.0),
    "denoise": StageCost(per_step=True, cfg_factor=2.0),
    "decode": StageCost(),
}
"""Per stage, the structure a measured profile is fitted in (its coefficients are what is
fitted): guidance encodes the negative prompt too and runs the DiT twice per step, and the
DiT's work repeats every step."""


def _size(value: object) -> object:
    """``256`` (square) or ``384x256`` (WIDTHxHEIGHT) as (width, height)."""
    if isinstance(value, str):
        width, cross, height = value.lower().partition("x")
        return (width, height) if cross else (width, width)
    return (value, value) if isinstance(value, int) else value


Values = Annotated[tuple[PositiveInt, ...], Field(min_length=1), BeforeValidator(comma_list)]


class Grid(BaseModel):
    """The job shapes measured: every combination of the values below. Each field also takes
    comma-separated text, e.g. ``sizes="128,384x256"``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sizes: Annotated[
        tuple[Annotated[tuple[PositiveInt, PositiveInt], BeforeValidator(_size)], ...],
        Field(min_length=1), BeforeValidator(comma_list),
    ] = ((128, 128), (256, 256), (384, 384), (512, 512))
    """(width, height) pairs."""
    steps: Values = (2, 4)
    guidance: Annotated[tuple[Annotated[float, Field(ge=0)], ...], Field(min_length=1), BeforeValidator(comma_list)] = (1.0, 4.5)
    """1 runs without classifier-free guidance; above 1 with it (the DiT runs twice per step)."""
    prompt_chars: Values = (16, 240)
    frames: Values = (1,)
    batches: Values = (1, 2)

    def points(self, model: str) -> list[list[JobSpec]]:
        """One batch of jobs per combination; the jobs of a batch differ only in their seed."""
        points = []
        combinations = itertools.product(self.batches, self.prompt_chars, self.guidance, self.sizes, self.frames, self.steps)
        for batch, chars, guidance, (width, height), frames, steps in combinations:
            prompt = (PROMPT_TEXT * (chars // len(PROMPT_TEXT) + 1))[:chars]
            points.append([
                JobSpec(model=model, prompt=prompt, seed=seed, width=width, height=height, frames=frames, steps=steps,
                        guidance=guidance)
                for seed in range(batch)
            ])
        return points

    def measurements(self, model: str) -> int:
        """How many (stage, shape) timings the grid takes."""
        return len({_key(stage, batch) for batch in self.points(model) for stage in STAGES})

    def text(self, field: str) -> str:
        """A field as comma-separated text (the form the command line takes)."""
        if field == "sizes":
            return ",".join(f"{w}x{h}" for w, h in self.sizes)
        return ",".join(f"{v:g}" for v in getattr(self, field))


def _key(stage: str, batch: Sequence[JobSpec]) -> tuple[Hashable, ...]:
    """Batches alike in it cost the same at ``stage`` as a profile is fitted (equal features
    for the fitted terms), so they are measured once. Guidance stays apart where the structure
    says it multiplies the work (cfg_factor): timing both is how a profile checks that."""
    structure = STRUCTURE[stage]
    guided = batch[0].guided if structure.cfg_factor != 1.0 else None
    return stage, len(batch), guided, tuple(structure.features(batch[:1], PREDICTOR_TERMS[stage]))


class Measurement(BaseModel):
    """What ``measure`` did: the timings, and the facts a reader needs to trust them."""

    model: str
    samples: list[TimingSample]
    grid: Grid
    runs: int
    started: datetime
    elapsed_s: float
    device: str
    """``cpu``, or ``cuda: <GPU name>``."""
    dtype: str
    threads: int
    machine: dict[str, object] = Field(default_factory=dict)
    """``disagfusion.machine.describe()``: CPU, cores, torch, load average, GPU."""
    weight_bytes: dict[str, int] = Field(default_factory=dict)
    """Per stage, the bytes of weights it loads (from the model's files): the profile carries
    them, so the planner places the model by memory without its checkpoint."""

    @property
    def command(self) -> str:
        """The ``disagfusion profile`` command line that measures the same grid."""
        options = " ".join(f"--{name.replace('_', '-')} {self.grid.text(name)}" for name in Grid.model_fields)
        threads = f" --threads {self.threads}" if self.device == "cpu" else ""
        return f"disagfusion profile {self.model} {options} --runs {self.runs}{threads}"

    @property
    def hardware(self) -> str:
        """One line: the device, and for a CPU its model, cores and the threads torch used."""
        if self.device != "cpu":
            return self.device
        return f"cpu: {self.machine.get('cpu')}, {self.threads} torch thread(s) of {self.machine.get('cores')} cores"

    @property
    def device_slug(self) -> str:
        """The device in a file name: ``cpu``, or the GPU's model (``h100`` for "NVIDIA H100 80GB HBM3")."""
        kind, _, name = self.device.partition(": ")
        words = [w for w in name.lower().split() if w not in ("nvidia", "tesla", "geforce")]
        return words[0] if words else kind

    def by_stage(self) -> dict[str, list[TimingSample]]:
        return {stage: [s for s in self.samples if s.stage == stage] for stage in STAGES}


class Fit(BaseModel):
    """The fitted profile and how well it reproduces the samples it was fitted to."""

    profile: CostProfile
    median_error: dict[str, float]
    """Per stage, median of |fitted − measured| / measured over the grid."""
    max_error: dict[str, float]


def _synchronize(device: torch.device) -> Callable[[], None]:
    """Kernels on an accelerator run asynchronously; the clock stops only when they are done."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_stage(model: StageModel, jobs: list[JobSpec], inputs: list[Tensors], runs: int,
               synchronize: Callable[[], None]) -> tuple[float, list[Tensors]]:
    """Fastest of ``runs`` runs of one batch, after a warm-up run (first calls allocate memory
    and pick kernels); with the outputs, for the next stage."""
    outputs = model.run(jobs, inputs)
    synchronize()
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        outputs = model.run(jobs, inputs)
        synchronize()
        best = min(best, time.perf_counter() - started)
    return best, outputs


def load_stages(model: str, settings: Settings) -> dict[str, StageModel]:
    """The stage models of ``model`` as the services load them. Raises ``SpecError`` (field
    ``model``) for a model that is neither a preset nor a model directory."""
    return {stage: load_stage_model(model, stage, settings) for stage in STAGES}


def measure(
    model: str,
    settings: Settings,
    grid: Grid,
    runs: int = 3,
    on_sample: Callable[[TimingSample], None] | None = None,
    models: dict[str, StageModel] | None = None,
) -> Measurement:
    """Time every stage of ``model`` over ``grid`` (``models``: its stages, if already loaded).
    ``on_sample`` is called after each timing (for a progress bar). Raises ``SpecError`` if the
    model cannot run a job of the grid (a size its geometry does not allow) before timing any."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    started, clock = datetime.now(UTC), time.perf_counter()
    models = models or load_stages(model, settings)
    points = grid.points(model)
    for batch in points:
        models["encode"].check(batch[0])
    device = torch.device(settings.device)
    synchronize = _synchronize(device)
    worker = f"disagfusion-profile@{platform.node()}"
    samples: list[TimingSample] = []
    outputs: dict[tuple[Hashable, ...], list[Tensors]] = {}
    for batch in points:
        inputs: list[Tensors] = [{} for _ in batch]
        for stage in STAGES:
            key = _key(stage, batch)
            if key not in outputs:
                seconds, outputs[key] = time_stage(models[stage], batch, inputs, runs, synchronize)
                sample = TimingSample(stage=stage, model=model, worker=worker, batch=len(batch), seconds=seconds,
                                      jobs=[sampled(job) for job in batch])
                samples.append(sample)
                if on_sample is not None:
                    on_sample(sample)
            inputs = outputs[key]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return Measurement(
        model=model, samples=samples, grid=grid, runs=runs, started=started, elapsed_s=time.perf_counter() - clock,
        device=f"{device.type}: {name}" if name else device.type, dtype=settings.dtype,
        threads=torch.get_num_threads(), machine=describe(), weight_bytes=weight_bytes(model, settings),
    )


def fit(measurement: Measurement) -> Fit:
    """Fit each stage's cost in the predictor's terms (``PREDICTOR_TERMS``), its coefficients
    kept to four significant digits (more than the timings on which they rest), and say how far
    that is from the measured samples."""
    fitted: dict[str, StageCost] = {}
    median_error, max_error = {}, {}
    for stage, samples in measurement.by_stage().items():
        observations = [(s.jobs, s.seconds) for s in samples]
        structure = STRUCTURE[stage]
        exact = fit_stage_cost(observations, per_step=structure.per_step, cfg_factor=structure.cfg_factor,
                               use=PREDICTOR_TERMS[stage], batch_exponent=1.0)
        cost = fitted[stage] = exact.model_copy(update={term: float(f"{getattr(exact, term):.4g}") for term in COEFFICIENTS})
        errors = [abs(cost.seconds(jobs) / seconds - 1.0) for jobs, seconds in observations]
        median_error[stage], max_error[stage] = statistics.median(errors), max(errors)
    errors = ", ".join(f"{stage} {median_error[stage]:.1%} ({max_error[stage]:.1%})" for stage in STAGES)
    profile = CostProfile(
        model=measurement.model,
        hardware=measurement.hardware,
        kind="measured",
        source=(
            f"measured by `{measurement.command}` at {measurement.started:%Y-%m-%d %H:%M} UTC on "
            f"{measurement.hardware} (torch {measurement.machine.get('torch')}, {measurement.dtype}, load average "
            f"{measurement.machine.get('load_average_1m')} at the end): each stage loaded as the services load it and timed at "
            f"the {len(measurement.samples)} stage shapes of the grid, fastest of {measurement.runs} run(s) after a "
            f"warm-up; linear least-squares fit on the relative error; median (max) relative fit error: {errors}"
        ),
        stages=fitted,
        fit_error={stage: round(error, 4) for stage, error in median_error.items()},
        weight_bytes={stage: size for stage, size in measurement.weight_bytes.items() if size},
    )
    return Fit(profile=profile, median_error=median_error, max_error=max_error)

