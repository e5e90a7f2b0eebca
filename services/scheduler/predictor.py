"""Per (model, stage) service-time prediction from job features, starting from a cost profile
and refined online from the timing samples workers publish on ``df.metrics.<stage>``.

The model is linear in a few features per stage (see ``features``): a per-batch constant plus
work terms that sum over the batch's jobs. Classifier-free guidance (guidance > 1) runs the DiT
twice per step and encodes the negative prompt too, so it doubles those terms. Refinement is
Bayesian linear regression on the *relative* error (each sample weighted by 1/seconds), with
the profile as the prior and a forgetting factor so the fit follows a drifting device.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, Field

# Tokens are estimated from characters as the runtime profiles count them (so a measured profile
# rewrites exactly), tokenizer-free on purpose: the scheduler must not load every model's
# tokenizer to guess a cost.
from disagfusion.cost import prompt_tokens
from disagfusion.protocol import STAGES, JobSpec, TimingSample

FEATURES: dict[str, tuple[str, ...]] = {
    "encode": ("batch", "prompts", "tokens"),
    "denoise": ("batch", "step_jobs", "step_mpx"),
    "decode": ("batch", "jobs", "mpx"),
}
"""Per stage, the names of the linear model's features, in coefficient order."""


def cfg_factor(job: JobSpec) -> int:
    return 2 if job.guidance > 1.0 else 1


def features(stage: str, jobs: Sequence[JobSpec]) -> np.ndarray:
    """The feature vector of one batch of ``jobs`` at ``stage`` (see FEATURES)."""
    if stage == "encode":
        prompts = sum(cfg_factor(j) for j in jobs)
        tokens = sum(prompt_tokens(j.prompt) + (prompt_tokens(j.negative_prompt) if cfg_factor(j) == 2 else 0) for j in jobs)
        return np.array([1.0, prompts, tokens])
    if stage == "denoise":
        step_jobs = sum(j.steps * cfg_factor(j) for j in jobs)
        step_mpx = sum(j.steps * cfg_factor(j) * j.height * j.width * j.frames / 1e6 for j in jobs)
        return np.array([1.0, step_jobs, step_mpx])
    if stage == "decode":
        return np.array([1.0, len(jobs), sum(j.height * j.width * j.frames / 1e6 for j in jobs)])
    raise ValueError(f"unknown stage {stage!r}")


class ModelProfile(BaseModel):
    encode: dict[str, float] = Field(default_factory=dict)
    denoise: dict[str, float] = Field(default_factory=dict)
    decode: dict[str, float] = Field(default_factory=dict)

    def vector(self, stage: str) -> np.ndarray:
        coefficients: dict[str, float] = getattr(self, stage)
        unknown = set(coefficients) - set(FEATURES[stage])
        if unknown:
            raise ValueError(f"{stage}: unknown features {sorted(unknown)}; known: {FEATURES[stage]}")
        return np.array([coefficients.get(name, 0.0) for name in FEATURES[stage]])


class CostProfile(BaseModel):
    """A cost profile file in deploy/profiles/scheduler/: where its figures come from, on what device,
    and per model the coefficients of each stage."""

    source: str
    """Who measured what, or that the figures are placeholders."""
    kind: str = "measured"
    """measured (``disagfusion profile``), published (someone else's figures) or placeholder."""
    device: str
    models: dict[str, ModelProfile]
    fit_error: dict[str, dict[str, float]] = Field(default_factory=dict)
    """Measured profiles: per model and stage, the median relative error of the fit on the
    samples it was fitted to (what to expect of the profile before online refinement)."""

    def save(self, path: Path) -> None:
        """Write the profile as YAML (the form ``load_profiles`` reads)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.model_dump(), sort_keys=False, width=100))

    def scaled(self, factors: dict[str, float]) -> CostProfile:
        """This profile with every coefficient of a stage multiplied by its factor: a profile
        that is off, as one measured on another device would be, to test learning against."""
        models = {
            name: model.model_copy(update={s: {k: v * f for k, v in getattr(model, s).items()} for s, f in factors.items()})
            for name, model in self.models.items()
        }
        return self.model_copy(update={"models": models, "source": f"{self.source} (scaled per stage by {factors})"})


def load_profiles(paths: Iterable[Path]) -> dict[str, CostProfile]:
    """Profiles by file stem, from YAML or JSON files or directories of them."""
    profiles = {}
    for path in paths:
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json")) if path.is_dir() else [path]
        for file in files:
            raw = json.loads(file.read_text()) if file.suffix == ".json" else yaml.safe_load(file.read_text())
            profiles[file.stem] = CostProfile.model_validate(raw)
    return profiles


class _Fit:
    """Bayesian linear regression for one (model, stage) on the relative error, with the profile
    as the prior and exponential forgetting of old samples. The prior never decays, so a
    direction the samples never excite (a phase of one job shape excites one) stays at the
    profile's value instead of drifting: this is what keeps it stable where plain recursive
    least squares with forgetting winds up."""

    def __init__(self, prior: np.ndarray, prior_rel_sd: float, noise_rel_sd: float, forgetting: float):
        self.prior = prior.astype(float)
        scale = np.where(self.prior > 0, self.prior, max(float(self.prior.max()), 1e-3) * 1e-2)
        self.prior_precision = np.diag(1.0 / (prior_rel_sd * scale) ** 2)
        self.data_precision = np.zeros_like(self.prior_precision)
        self.data_evidence = np.zeros_like(self.prior)
        self.noise_precision = 1.0 / noise_rel_sd**2
        self.forgetting = forgetting
        self.theta = self.prior.copy()
        self.rel_error: float | None = None
        self.samples = 0

    def predict(self, x: np.ndarray) -> float:
        return float(max(x @ self.theta, 1e-6))

    def update(self, x: np.ndarray, seconds: float, error_alpha: float) -> None:
        predicted = self.predict(x)
        error = abs(predicted - seconds) / seconds
        self.rel_error = error if self.rel_error is None else (1 - error_alpha) * self.rel_error + error_alpha * error
        z = x / seconds  # weight 1/seconds: fit the relative, not the absolute, error (target 1)
        self.data_precision = self.forgetting * self.data_precision + self.noise_precision * np.outer(z, z)
        self.data_evidence = self.forgetting * self.data_evidence + self.noise_precision * z
        self.theta = np.linalg.solve(
            self.prior_precision + self.data_precision, self.prior_precision @ self.prior + self.data_evidence
        )
        self.samples += 1


class PredictorError(BaseModel):
    model: str
    stage: str
    samples: int
    rel_error: float | None
    """EWMA of |predicted − measured| / measured, before each sample refined the fit."""


class Predictor:
    """Predicted seconds of a batch at a stage on the profile's reference device."""

    def __init__(
        self,
        profiles: dict[str, CostProfile],
        prior_rel_sd: float = 1.0,
        noise_rel_sd: float = 0.05,
        forgetting: float = 0.995,
        error_alpha: float = 0.1,
    ):
        self._prior = {m: p for profile in profiles.values() for m, p in profile.models.items()}
        self._fits: dict[tuple[str, str], _Fit] = {}
        self._settings = (prior_rel_sd, noise_rel_sd, forgetting)
        self._error_alpha = error_alpha
        self._job_features: dict[tuple, list[np.ndarray]] = {}

    @property
    def models(self) -> list[str]:
        return sorted(self._prior)

    def _fit(self, model: str, stage: str) -> _Fit:
        key = (model, stage)
        fit = self._fits.get(key)
        if fit is None:
            if model not in self._prior:
                raise KeyError(f"no cost profile for model {model!r} (profiles have {self.models})")
            fit = self._fits[key] = _Fit(self._prior[model].vector(stage), *self._settings)
        return fit

    def predict(self, stage: str, jobs: Sequence[JobSpec]) -> float:
        return self._fit(jobs[0].model, stage).predict(features(stage, jobs))

    def job_costs(self, job: JobSpec) -> tuple[float, ...]:
        """Predicted seconds of ``job`` alone at each stage, in STAGES order. The features are
        cached by what they depend on (planning a large fleet asks this for every job)."""
        key = (job.shape_key, len(job.prompt), len(job.negative_prompt))
        vectors = self._job_features.get(key)
        if vectors is None:
            vectors = self._job_features[key] = [features(s, [job]) for s in STAGES]
        return tuple(self._fit(job.model, s).predict(x) for s, x in zip(STAGES, vectors))

    def observe(self, sample: TimingSample, speed: float = 1.0) -> None:
        """Refine from one measured batch, run on a device ``speed`` times the reference."""
        if not sample.jobs or sample.seconds <= 0:
            return
        fit = self._fit(sample.model, sample.stage)
        fit.update(features(sample.stage, sample.jobs), sample.seconds * speed, self._error_alpha)

    def errors(self) -> list[PredictorError]:
        return [
            PredictorError(model=m, stage=s, samples=f.samples, rel_error=f.rel_error)
            for (m, s), f in sorted(self._fits.items())
        ]
