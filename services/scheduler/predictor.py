"""Per (model, stage) service-time prediction, starting from a model's cost profile
(``disagfusion.cost``) and refined online from the timing samples workers publish on
``df.metrics.<stage>``.

The profile's ``StageCost`` is the model: its structural fields (per_step, cfg_factor,
batch_exponent) stay as the profile gives them, and so does every coefficient outside the
stage's ``PREDICTOR_TERMS``; those (a per-batch constant plus the stage's main work) are refined
by Bayesian linear regression on the *relative* error (each sample weighted by 1/seconds), with
the profile as the prior and a forgetting factor so the fit follows a drifting device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from pydantic import BaseModel

from disagfusion.cost import COEFFICIENTS, PREDICTOR_TERMS, CostProfile, JobWork, StageCost
from disagfusion.protocol import STAGES, JobSpec, SampledJob, TimingSample


class _Fit:
    """Bayesian linear regression for one (model, stage) on the relative error, with the profile
    as the prior and exponential forgetting of old samples. The prior never decays, so a
    direction the samples never excite (a phase of one job shape excites one) stays at the
    profile's value instead of drifting: this is what keeps it stable where plain recursive
    least squares with forgetting winds up.

    It works in the units of ``StageCost.features`` (seconds per token, not per thousand), so a
    zero coefficient's prior scale, taken relative to the largest refined coefficient, compares
    like with like."""

    def __init__(self, cost: StageCost, terms: Sequence[str], prior_rel_sd: float, noise_rel_sd: float, forgetting: float):
        self.cost, self.terms = cost, tuple(terms)
        held = [term for term in COEFFICIENTS if term not in self.terms and getattr(cost, term)]
        self.held: StageCost | None = cost.model_copy(update=dict.fromkeys(self.terms, 0.0)) if held else None
        """The profile's coefficients outside ``terms``, which are not refined: None when all are 0."""
        self.prior = cost.coefficients(self.terms)
        scale = np.where(self.prior > 0, self.prior, max(float(self.prior.max()), 1e-3) * 1e-2)
        self.prior_precision = np.diag(1.0 / (prior_rel_sd * scale) ** 2)
        self.data_precision = np.zeros_like(self.prior_precision)
        self.data_evidence = np.zeros_like(self.prior)
        self.noise_precision = 1.0 / noise_rel_sd**2
        self.forgetting = forgetting
        self.theta = self.prior.copy()
        self.rel_error: float | None = None
        self.samples = 0

    def inputs(self, jobs: Sequence[JobSpec | SampledJob]) -> tuple[np.ndarray, float]:
        """The batch's features for the refined terms, and the seconds of the terms held."""
        return self.cost.features(jobs, self.terms), self.held.seconds(jobs) if self.held is not None else 0.0

    def predict(self, x: np.ndarray, held: float) -> float:
        return float(max(x @ self.theta + held, 1e-6))

    def update(self, x: np.ndarray, held: float, seconds: float, error_alpha: float) -> None:
        predicted = self.predict(x, held)
        error = abs(predicted - seconds) / seconds
        self.rel_error = error if self.rel_error is None else (1 - error_alpha) * self.rel_error + error_alpha * error
        z = x / seconds  # weight 1/seconds: fit the relative, not the absolute, error
        target = (seconds - held) / seconds  # what the refined terms are to explain (1 when none are held)
        self.data_precision = self.forgetting * self.data_precision + self.noise_precision * np.outer(z, z)
        self.data_evidence = self.forgetting * self.data_evidence + self.noise_precision * z * target
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
        profiles: Iterable[CostProfile],
        prior_rel_sd: float = 1.0,
        noise_rel_sd: float = 0.05,
        forgetting: float = 0.995,
        error_alpha: float = 0.1,
    ):
        self._profiles = {profile.model: profile for profile in profiles}
        self._fits: dict[tuple[str, str], _Fit] = {}
        self._settings = (prior_rel_sd, noise_rel_sd, forgetting)
        self._error_alpha = error_alpha
        self._job_inputs: dict[tuple[str, JobWork], list[tuple[np.ndarray, float]]] = {}

    @property
    def models(self) -> list[str]:
        return sorted(self._profiles)

    def _fit(self, model: str, stage: str) -> _Fit:
        key = (model, stage)
        fit = self._fits.get(key)
        if fit is None:
            if model not in self._profiles:
                raise KeyError(f"no cost profile for model {model!r} (profiles have {self.models})")
            cost = self._profiles[model].stage(stage)
            fit = self._fits[key] = _Fit(cost, PREDICTOR_TERMS[stage], *self._settings)
        return fit

    def predict(self, stage: str, jobs: Sequence[JobSpec]) -> float:
        fit = self._fit(jobs[0].model, stage)
        return fit.predict(*fit.inputs(jobs))

    def job_costs(self, job: JobSpec) -> tuple[float, ...]:
        """Predicted seconds of ``job`` alone at each stage, in STAGES order. The features are
        cached by the job's work (planning a large fleet asks this for every job)."""
        key = (job.model, JobWork.of(job))
        inputs = self._job_inputs.get(key)
        if inputs is None:
            inputs = self._job_inputs[key] = [self._fit(job.model, s).inputs([job]) for s in STAGES]
        return tuple(self._fit(job.model, s).predict(*x) for s, x in zip(STAGES, inputs))

    def observe(self, sample: TimingSample, speed: float = 1.0) -> None:
        """Refine from one measured batch, run on a device ``speed`` times the reference."""
        if not sample.jobs or sample.seconds <= 0:
            return
        fit = self._fit(sample.model, sample.stage)
        fit.update(*fit.inputs(sample.jobs), sample.seconds * speed, self._error_alpha)

    def errors(self) -> list[PredictorError]:
        return [
            PredictorError(model=m, stage=s, samples=f.samples, rel_error=f.rel_error)
            for (m, s), f in sorted(self._fits.items())
        ]
