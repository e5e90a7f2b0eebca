"""The cost model: how long one stage of one model takes for a batch of jobs, on some hardware,
and the one file format its figures are kept in (``CostProfile``, YAML in DF_PROFILES_DIR).

Everything that predicts work starts here: the scheduler's predictor (which refines a profile's
linear coefficients online), the emulated accelerator (``disagfusion.models.emulated``),
capacity planning, and ``disagfusion profile``, which fits a profile from measurements. It is
deliberately a small closed form with a handful of coefficients per stage, so it can be fitted
from a few measurements (``fit_stage_cost``) or derived from one published figure, and read by
a person.

For a batch of ``n`` jobs, per stage::

    seconds = fixed_s + n ** (batch_exponent - 1) * sum_j work_j

    work_j  = cfg_j * (per_job_s + per_mpixel_s * P_j + per_mpixel2_s * P_j**2) * (steps_j if per_step else 1)
            + per_ktoken_s * tokens_j / 1000

    P_j      = megapixel-frames (``JobSpec.megapixel_frames``: the size of the output)
    cfg_j    = cfg_factor when the job is guided (``JobSpec.guided``: classifier-free guidance
               runs the conditional and the unconditional pass, and encodes the negative
               prompt), else 1
    tokens_j = prompt length, plus the negative prompt's when guided, estimated as
               ceil(characters / 4), the usual subword rule of thumb

``batch_exponent`` = 1 means batching saves nothing but ``fixed_s``; below 1 a batch of ``n``
costs less than ``n`` single jobs (an accelerator that was not saturated by one job). The
quadratic term is there for attention over many latent tokens (video); it is 0 unless fitted.

The formula is linear in its five coefficients (``COEFFICIENTS``): ``StageCost.features`` is
the one place a batch's feature vector is computed, and ``seconds`` is that vector times the
coefficients. The structural fields (per_step, cfg_factor, batch_exponent) shape the features.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from disagfusion.config import ModelSettings
from disagfusion.protocol import STAGES, JobSpec, SampledJob, Stage

CHARS_PER_TOKEN = 4

COEFFICIENTS = ("fixed_s", "per_job_s", "per_ktoken_s", "per_mpixel_s", "per_mpixel2_s")
"""The linear coefficients of a stage, in feature-vector order."""

PREDICTOR_TERMS: dict[Stage, tuple[str, ...]] = {
    Stage.ENCODE: ("fixed_s", "per_job_s", "per_ktoken_s"),
    Stage.DENOISE: ("fixed_s", "per_job_s", "per_mpixel_s"),
    Stage.DECODE: ("fixed_s", "per_job_s", "per_mpixel_s"),
}
"""Per stage, the coefficients the scheduler's predictor refines online and ``disagfusion
profile`` fits: a per-batch constant plus the work that dominates the stage. The others stay
at the profile's value (few timing samples cannot separate more terms)."""

_FEATURE_UNIT = {"per_ktoken_s": 1000.0}
"""Coefficients whose feature counts a smaller unit than the coefficient is written in: the
token feature counts tokens (exact integers, so sums of them are exact) while the file keeps
seconds per thousand tokens (a figure a person can read)."""


def prompt_tokens(text: str) -> int:
    """Tokens of a prompt, estimated from its characters: tokenizer-free on purpose, so the
    scheduler never loads a model's tokenizer to guess a cost."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


class JobWork(NamedTuple):
    """All the cost model reads of a job: jobs with equal work cost the same at every stage
    of one model, so (model, work) is an exact key for a cache of their costs."""

    guided: bool
    steps: int
    tokens: int
    """Prompt tokens, plus the negative prompt's when guided."""
    megapixel_frames: float

    @classmethod
    def of(cls, job: JobSpec | SampledJob) -> JobWork:
        """The work of a job, from its spec or from a timing sample's description of it."""
        if isinstance(job, SampledJob):
            return cls(job.guided, job.steps, job.tokens, job.megapixel_frames)
        tokens = prompt_tokens(job.prompt) + (prompt_tokens(job.negative_prompt) if job.guided else 0)
        return cls(job.guided, job.steps, tokens, job.megapixel_frames)


def sampled(spec: JobSpec) -> SampledJob:
    """How a timing sample names ``spec``: its id and work, not its prompt."""
    return SampledJob(job_id=spec.job_id, model=spec.model, **JobWork.of(spec)._asdict())


CostKey = tuple[str, int, int, int, int, float, int]


def cost_key(stage: str, spec: JobSpec) -> CostKey:
    """Jobs with the same key take about as long at ``stage``: one shape (``JobSpec.shape_key``),
    and at the encoder prompts of one length in powers of two, so keys stay few. A stage worker
    times the jobs in hand by it (its table of measured seconds per job), and the simulation
    keys its model of that table on it. Coarser than ``JobWork``, which is exact."""
    return (*spec.shape_key, len(spec.prompt).bit_length() if stage == "encode" else 0)


class StageCost(BaseModel):
    """Coefficients of one stage; see the module docstring for the formula."""

    model_config = ConfigDict(frozen=True)

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

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, data: object) -> object:
        """Refuse a name that is not a field, saying which are (a misspelt coefficient in a
        hand-written profile would otherwise be a silent 0)."""
        if isinstance(data, Mapping):
            unknown = set(data) - set(cls.model_fields)
            if unknown:
                raise ValueError(f"unknown features {sorted(unknown)}; a stage's cost has {', '.join(cls.model_fields)}")
        return data

    def _job_features(self, work: JobWork) -> tuple[float, int, float, float]:
        """(job, tokens, mpixel, mpixel²) of one job, with guidance and steps folded in: the
        features of the terms that sum over a batch's jobs."""
        repeat = (self.cfg_factor if work.guided else 1.0) * (work.steps if self.per_step else 1)
        p = work.megapixel_frames
        # The negative prompt's tokens are counted themselves, not through cfg_factor.
        return repeat, work.tokens, p * repeat, p * p * repeat

    def features(self, specs: Sequence[JobSpec | SampledJob], terms: Sequence[str] = COEFFICIENTS) -> np.ndarray:
        """The feature vector of one (non-empty) batch for the coefficients ``terms``, in that
        order: 1 for ``fixed_s``, else the jobs' features summed with the batch discount."""
        per_job = [self._job_features(JobWork.of(spec)) for spec in specs]
        scale = len(specs) ** (self.batch_exponent - 1.0)
        sums = (scale * sum(column) for column in zip(*per_job))
        by_term = dict(zip(COEFFICIENTS, (1.0, *sums)))
        return np.array([by_term[term] for term in terms], dtype=float)

    def coefficients(self, terms: Sequence[str] = COEFFICIENTS) -> np.ndarray:
        """The coefficients ``terms`` in the units of ``features`` (per token, not per thousand)."""
        return np.array([getattr(self, term) / _FEATURE_UNIT.get(term, 1.0) for term in terms])

    def with_coefficients(self, values: Mapping[str, float]) -> StageCost:
        """This cost with the coefficients in ``values`` (in the units of ``features``) replaced."""
        return self.model_copy(update={term: float(v) * _FEATURE_UNIT.get(term, 1.0) for term, v in values.items()})

    def seconds(self, specs: Sequence[JobSpec | SampledJob]) -> float:
        if not specs:
            return 0.0
        return float(self.features(specs) @ self.coefficients())


ProfileKind = Literal["measured", "published", "placeholder", "synthetic"]


class CostProfile(BaseModel):
    """Service times of every stage of one model on one kind of hardware: the one cost
    profile file format (YAML, ``<name>.yaml`` in DF_PROFILES_DIR)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    """The model name jobs carry (``JobSpec.model``): the scheduler's predictor finds a model's
    profile by it."""
    hardware: str
    source: str
    """Where the numbers come from: measured here (command, machine), a published figure, or
    that they are synthetic or placeholders. Results that rest on a profile must say which."""
    kind: ProfileKind
    """measured (``disagfusion profile``), published (someone else's figures), placeholder
    (guesses to replace) or synthetic (made up for a benchmark or an emulated model)."""
    stages: dict[Stage, StageCost]
    fit_error: dict[Stage, float] = Field(default_factory=dict)
    """Measured profiles: per stage, the median relative error of the fit on the samples it
    was fitted to (what to expect of the profile before online refinement)."""
    weight_bytes: dict[Stage, int] = Field(default_factory=dict)
    """Per stage, the bytes of weights it holds on the device (``disagfusion.memory``): lets
    the planner place stages by memory without the checkpoint at hand. A model whose files
    are in the models dir is measured from them instead."""
    activation_bytes: dict[Stage, int] = Field(default_factory=dict)
    """Per stage, the working memory beyond weights at the sizes the profile was made for
    (activations, attention buffers, the VAE's decoded frames); missing: an allowance in
    proportion to the weights (``disagfusion.memory.ACTIVATION_ALLOWANCE``)."""

    def seconds(self, stage: str, specs: Sequence[JobSpec]) -> float:
        """Predicted service time of one batch of ``specs`` at ``stage``."""
        return self.stage(stage).seconds(specs)

    def stage(self, stage: str) -> StageCost:
        if stage not in self.stages:
            raise KeyError(f"profile of {self.model} has no stage {stage!r} (has {', '.join(self.stages)})")
        return self.stages[stage]

    def job_seconds(self, spec: JobSpec) -> dict[str, float]:
        """Each stage's time for ``spec`` run alone, in pipeline order."""
        return {stage: self.seconds(stage, [spec]) for stage in STAGES if stage in self.stages}

    def scaled(self, factors: Mapping[str, float]) -> CostProfile:
        """This profile with every coefficient of a stage multiplied by its factor: a profile
        that is off, as one measured on another device would be, to test learning against."""
        stages = {
            stage: cost.model_copy(update={term: getattr(cost, term) * factors[stage] for term in COEFFICIENTS})
            if stage in factors else cost
            for stage, cost in self.stages.items()
        }
        return self.model_copy(update={"stages": stages, "source": f"{self.source} (scaled per stage by {dict(factors)})"})

    @classmethod
    def load(cls, path: Path) -> CostProfile:
        """A profile file (YAML; JSON, being YAML, reads too)."""
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))

    @classmethod
    def named(cls, name: str, directory: Path | None = None) -> CostProfile:
        """A profile by file name without ``.yaml``, from ``directory`` or DF_PROFILES_DIR
        (deploy/profiles/ in the source tree)."""
        directory = directory or ModelSettings().profiles_dir
        path = directory / f"{name}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"cost profile {name!r} is not in {directory} (set DF_PROFILES_DIR to where deploy/profiles is)")
        return cls.load(path)

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, width=100))


PROFILE_SUFFIXES = (".yaml", ".yml", ".json")


def load_profiles(paths: Iterable[Path]) -> dict[str, CostProfile]:
    """Profiles by file name without suffix, from profile files or directories of them."""
    profiles = {}
    for path in paths:
        files = sorted(p for p in path.iterdir() if p.suffix in PROFILE_SUFFIXES) if path.is_dir() else [path]
        for file in files:
            profiles[file.stem] = CostProfile.load(file)
    return profiles


Observation = tuple[Sequence[JobSpec], float]
"""A batch that ran and the seconds it took (a ``TimingSample`` gives ``(jobs, seconds)``)."""


def fit_stage_cost(
    observations: Sequence[Observation],
    *,
    per_step: bool,
    cfg_factor: float = 1.0,
    use: Sequence[str] = COEFFICIENTS,
    batch_exponent: float | None = None,
) -> StageCost:
    """Least-squares fit of one stage's coefficients (non-negative), on relative error.

    ``use`` names the coefficients free to fit; the rest stay 0 (with few observations, fit
    fewer terms). ``batch_exponent`` is found by a grid search, as the formula is linear in
    everything else, unless it is given (1.0 keeps the form linear, as the scheduler's predictor is).
    """
    unknown = [name for name in use if name not in COEFFICIENTS]
    if unknown:
        raise ValueError(f"unknown coefficients {unknown}; choose from {COEFFICIENTS}")
    shape = StageCost(per_step=per_step, cfg_factor=cfg_factor)
    seconds = np.array([s for _, s in observations], dtype=float)
    if batch_exponent is not None:
        exponents = [batch_exponent]
    else:
        exponents = list(np.linspace(0.5, 1.0, 26)) if any(len(specs) > 1 for specs, _ in observations) else [1.0]
    best: tuple[float, StageCost] | None = None
    for exponent in exponents:
        trial = shape.model_copy(update={"batch_exponent": float(exponent)})
        design = np.array([trial.features(specs, use) for specs, _ in observations])
        coefficients = _nonnegative_lstsq(design / seconds[:, None], np.ones_like(seconds))
        error = float(np.sum((design @ coefficients / seconds - 1.0) ** 2))
        if best is None or error < best[0] - 1e-12:
            best = (error, trial.with_coefficients(dict(zip(use, coefficients))))
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
