"""The predictor's starting point for every model a live deployment serves: the scheduler's
own profiles (YAML in deploy/profiles/) plus, for models with a runtime cost profile
(``disagfusion.cost.CostProfile``: the emulated family), that profile rewritten in the
predictor's features. ``measured_profile`` rewrites what ``disagfusion profile`` measured the
same way, for a file in deploy/profiles/scheduler/.

The rewrite is exact for the per-step DiT terms and for jobs without classifier-free guidance;
a runtime profile with a per-job (not per-step) DiT cost, like the synthetic ``bench-pipeline``
profile of the ``emulated`` preset, is spread over ``REFERENCE_STEPS`` steps (JobSpec's default),
and the online refinement corrects what that misses."""

from __future__ import annotations

from pathlib import Path

import yaml

from disagfusion.config import Settings
from disagfusion.models.emulated import PRESETS, PROFILE_FILE
from disagfusion.cost import CostProfile as RuntimeProfile
from disagfusion.profiling import Fit
from disagfusion.protocol import JobSpec
from services.scheduler.predictor import CostProfile, ModelProfile

REFERENCE_STEPS = JobSpec.model_fields["steps"].default


def scheduler_profiles(directory: Path) -> dict[str, CostProfile]:
    """The predictor-format profiles of ``directory`` (its YAML files; the JSON ones there are
    runtime profiles)."""
    files = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml"))
    return {f.stem: CostProfile.model_validate(yaml.safe_load(f.read_text())) for f in files}


def from_runtime(profile: RuntimeProfile) -> ModelProfile:
    encode, denoise, decode = (profile.stages[s] for s in ("encode", "denoise", "decode"))
    per_step = 1.0 if denoise.per_step else 1.0 / REFERENCE_STEPS
    return ModelProfile(
        encode={"batch": encode.fixed_s, "prompts": encode.per_job_s, "tokens": encode.per_ktoken_s / 1000},
        denoise={"batch": denoise.fixed_s, "step_jobs": denoise.per_job_s * per_step, "step_mpx": denoise.per_mpixel_s * per_step},
        decode={"batch": decode.fixed_s, "jobs": decode.per_job_s, "mpx": decode.per_mpixel_s},
    )


def measured_profile(fit: Fit) -> CostProfile:
    """The predictor's profile of a model measured by ``disagfusion profile``. Its fit keeps to
    the predictor's terms (``disagfusion.profiling.PREDICTOR_TERMS``), so the rewrite is exact;
    coefficients keep four significant digits, more than the timings on which they rest."""
    runtime = fit.profile
    coefficients = from_runtime(runtime).model_dump()
    rounded = {stage: {name: float(f"{value:.4g}") for name, value in terms.items()} for stage, terms in coefficients.items()}
    return CostProfile(
        source=runtime.source,
        kind="measured",
        device=runtime.hardware,
        models={runtime.model: ModelProfile.model_validate(rounded)},
        fit_error={runtime.model: {stage: round(error, 4) for stage, error in fit.median_error.items()}},
    )


def runtime_profile(model: str, settings: Settings) -> RuntimeProfile | None:
    """The runtime profile of a served model: its directory's, or its emulated preset's."""
    path = settings.models_dir / model / PROFILE_FILE
    if path.exists():
        return RuntimeProfile.load(path)
    if model in PRESETS:
        return RuntimeProfile.named(PRESETS[model].profile)
    return None


def live_profiles(directory: Path, settings: Settings) -> dict[str, CostProfile]:
    profiles = scheduler_profiles(directory)
    known = {m for p in profiles.values() for m in p.models}
    for model in settings.model_names:
        runtime = runtime_profile(model, settings) if model not in known else None
        if runtime is not None:
            profiles[f"runtime-{model}"] = CostProfile(
                source=f"rewritten from the runtime profile: {runtime.source}",
                kind="derived",
                device=runtime.hardware,
                models={model: from_runtime(runtime)},
            )
    return profiles
