"""Cost profiles: how long one stage of one model takes for a batch of jobs, on some hardware.

A profile is the shared starting point for anything that predicts work: the scheduler's cost
predictor, the emulated accelerator (``disagfusion.models.emulated``), capacity planning. It
is deliberately a small closed form with a handful of coefficients per stage, so it can be
fitted from a few measurements (``fit_stage_cost``, e.g. from ``TimingSample``s) or derived
from one published figure, and read by a person.

For a batch of ``n`` jobs, per stage::

    seconds = fixed_s + n ** (batch_exponent - 1) * sum_j work_j

    work_j  = cfg_j * (per_job_s + per_mpixel_s * P_j + per_mpixel2_s * P_j**2) * (steps_j if per_step else 1)
            + per_ktoken_s * tokens_j / 1000

    P_j     = height * width * frames / 1e6   (megapixel-frames: the size of the output)
    cfg_j   = cfg_factor when guidance_j > 1 (classifier-free guidance runs the conditional and
              the unconditional pass, and encodes the negative prompt), else 1
    tokens_j = prompt length, plus the negative prompt's when guidance_j > 1, estimated as
              ceil(characters / 4), the usual subword rule of thumb

``batch_exponent`` = 1 means batching saves nothing but ``fixed_s``; below 1 a batch of ``n``
costs less than ``n`` single jobs (an accelerator that was not saturated by one job). The
quadratic term is there for attention over many latent tokens (video); it is 0 unless fitted.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from disagfusion.config import Settings
from disagfusion.protocol import STAGES, JobSpec

Stage = Literal["encode", "denoise", "decode"]

CHARS_PER_TOKEN = 4


def prompt_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def megapixel_frames(spec: JobSpec) -> float:
    return spec.height * spec.width * spec.frames / 1e6


CostKey = tuple[str, int, int, int, int, float, int]


def cost_key(stage: str, spec: JobSpec) -> CostKey:
    """Jobs with the same key take about as long at ``stage``: one shape (``JobSpec.shape_key``),
    and at the encoder prompts of one length in powers of two, so keys stay few. A stage worker
    times the jobs in hand by it (its table of measured seconds per job), and the simulation
    keys its model of that table on it."""
    return (*spec.shape_key, len(spec.prompt).bit_length() if stage == "encode" else 0)


class StageCost(BaseModel):
    """Coefficients of one stage; see the module docstring for the formula."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fixed_s: float = Field(default=0.0, ge=0)
    """Per batch, whatever its size (launch, synchronisation)."""
    per_job_s: float = Field(default=0.0, ge=0)
    per_ktoken_s: float = Field(default=0.0, ge=0)
    per_mpixel_s: float = Field(default=0.0, ge=0)
    per_mpixel2_s: float = Field(default=0.0, ge=0)
    per_step: bool = False
    """Per-job and pixel work is repeated every denoising step (true for the DiT)."""
    cfg_factor: float = Field(default=1.0, ge=1.0)
    batch_exponent: float = Field(default=1.0, gt=0, le=1.0)

    def features(self, spec: JobSpec) -> tuple[float, float, float, float]:
        """(job, ktokens, mpixel, mpixel²) of one job, with guidance and steps folded in."""
        cfg = self.cfg_factor if spec.guidance > 1.0 else 1.0
        tokens = prompt_tokens(spec.prompt) + (prompt_tokens(spec.negative_prompt) if spec.guidance > 1.0 else 0)
        repeat = cfg * (spec.steps if self.per_step else 1)
        p = megapixel_frames(spec)
        # The negative prompt's tokens are counted themselves, not through cfg_factor.
        return repeat, tokens / 1000, p * repeat, p * p * repeat

    def seconds(self, specs: Sequence[JobSpec]) -> float:
        if not specs:
            return 0.0
        coefficients = (self.per_job_s, self.per_ktoken_s, self.per_mpixel_s, self.per_mpixel2_s)
        work = sum(sum(c * f for c, f in zip(coefficients, self.features(spec))) for spec in specs)
        return self.fixed_s + len(specs) ** (self.batch_exponent - 1.0) * work


class CostProfile(BaseModel):
    """Service times of every stage of one model on one kind of hardware."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    """What was measured or cited, e.g. "Wan2.1-T2V-1.3B" (not necessarily a DF model name)."""
    hardware: str
    source: str
    """Where the numbers come from: measured here (command, machine), a cited public figure,
    or "synthetic". Emulated results must say which."""
    stages: dict[Stage, StageCost]

    def seconds(self, stage: str, specs: Sequence[JobSpec]) -> float:
        """Predicted service time of one batch of ``specs`` at ``stage``."""
        if stage not in self.stages:
            raise KeyError(f"profile of {self.model} has no stage {stage!r} (has {', '.join(self.stages)})")
        return self.stages[stage].seconds(specs)

    def job_seconds(self, spec: JobSpec) -> dict[str, float]:
        """Each stage's time for ``spec`` run alone, in pipeline order."""
        return {stage: self.seconds(stage, [spec]) for stage in STAGES if stage in self.stages}

    @classmethod
    def load(cls, path: Path) -> CostProfile:
        return cls.model_validate_json(Path(path).read_text())

    @classmethod
    def named(cls, name: str, directory: Path | None = None) -> CostProfile:
        """A shipped profile by file name without ``.json``, from ``directory`` or DF_PROFILES_DIR
        (deploy/profiles/ in the source tree)."""
        directory = directory or Settings().profiles_dir
        path = directory / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"cost profile {name!r} is not in {directory} (set DF_PROFILES_DIR to where deploy/profiles is)")
        return cls.load(path)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")


Observation = tuple[Sequence[JobSpec], float]
"""A batch that ran and the seconds it took (a ``TimingSample`` gives ``(jobs, seconds)``)."""

_COEFFICIENTS = ("fixed_s", "per_job_s", "per_ktoken_s", "per_mpixel_s", "per_mpixel2_s")


def fit_stage_cost(
    observations: Sequence[Observation],
    *,
    per_step: bool,
    cfg_factor: float = 1.0,
    use: Sequence[str] = _COEFFICIENTS,
    batch_exponent: float | None = None,
) -> StageCost:
    """Least-squares fit of one stage's coefficients (non-negative), on relative error.

    ``use`` names the coefficients free to fit; the rest stay 0 (with few observations, fit
    fewer terms). ``batch_exponent`` is found by a grid search, as the formula is linear in
    everything else, unless it is given (1.0 keeps the form linear, as the scheduler's predictor is).
    """
    unknown = [name for name in use if name not in _COEFFICIENTS]
    if unknown:
        raise ValueError(f"unknown coefficients {unknown}; choose from {_COEFFICIENTS}")
    shape = StageCost(per_step=per_step, cfg_factor=cfg_factor)
    seconds = np.array([s for _, s in observations], dtype=float)
    sums = np.array([np.sum([shape.features(spec) for spec in specs], axis=0) for specs, _ in observations])
    sizes = np.array([len(specs) for specs, _ in observations], dtype=float)
    columns = [_COEFFICIENTS.index(name) for name in use]
    has_batches = bool(np.any(sizes > 1))
    best: tuple[float, StageCost] | None = None
    if batch_exponent is not None:
        exponents = [batch_exponent]
    else:
        exponents = list(np.linspace(0.5, 1.0, 26)) if has_batches else [1.0]
    for exponent in exponents:
        design = np.column_stack([np.ones_like(seconds), sums * (sizes ** (exponent - 1.0))[:, None]])[:, columns]
        coefficients = _nonnegative_lstsq(design / seconds[:, None], np.ones_like(seconds))
        error = float(np.sum((design @ coefficients / seconds - 1.0) ** 2))
        if best is None or error < best[0] - 1e-12:
            values = dict.fromkeys(_COEFFICIENTS, 0.0) | {name: float(c) for name, c in zip(use, coefficients)}
            best = (error, shape.model_copy(update={**values, "batch_exponent": float(exponent)}))
    assert best is not None
    return best[1]


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest squared error with every coefficient >= 0: the best unconstrained fit over each
    subset of columns (the subsets are few: at most five coefficients)."""
    n = a.shape[1]
    best, best_error = np.zeros(n), float(np.sum(b**2))
    for k in range(1, n + 1):
        for subset in itertools.combinations(range(n), k):
            x, *_ = np.linalg.lstsq(a[:, subset], b, rcond=None)
            if np.any(x < 0):
                continue
            error = float(np.sum((a[:, subset] @ x - b) ** 2))
            if error < best_error - 1e-12:
                best, best_error = np.zeros(n), error
                best[list(subset)] = x
    return best
