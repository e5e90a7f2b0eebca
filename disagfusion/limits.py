"""Limits on one job and on the queue: how long a prompt may be, how much work a job may ask
for, by when it must be done, and how many jobs may wait.

Who checks what (settings: ``disagfusion.config.LimitSettings`` and ``BusSettings``):

- the client and the gateway, before publishing: prompt bytes, work (``check_job``) and the
  entry stage's queue depth (``check_queue_depth``), so a refused job is never queued;
- the entry stage (the encoder) at admission: ``check_job`` again (a client in another language
  may skip it), with the predicted seconds of the model's cost profile; the prompt's tokens are
  counted by the model's own tokenizer in its ``check`` (``disagfusion.models.family``);
- every stage, at admission and again before computing: the deadline (``check_deadline``); the
  DiT also between denoising steps (``stop_when_late``).

A job over a limit ends with an error result naming the limit (``LimitError``, a user's error:
no dead letter, no retry).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import nats.js.errors
from nats.js import JetStreamContext

from disagfusion.config import BusSettings, LimitSettings, Settings
from disagfusion.cost import load_profiles
from disagfusion.errors import DisagFusionError
from disagfusion.protocol import WORK_STREAM, JobSpec, Stage, StageTask, work_subject

log = logging.getLogger(__name__)


class LimitError(DisagFusionError, ValueError):
    """A job over one of the limits; ``field`` names the JobSpec field to change, if one does."""

    def __init__(self, field: str | None, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class QueueFull(DisagFusionError, RuntimeError):
    """A submission refused because the queue holds as much as it may: retry later."""


# ------------------------------------------------------------------ what one job asks for


def check_prompt_bytes(spec: JobSpec, limits: LimitSettings) -> None:
    for field in ("prompt", "negative_prompt"):
        size = len(getattr(spec, field).encode())
        if size > limits.max_prompt_bytes:
            raise LimitError(field, f"{size} bytes is longer than the limit of {limits.max_prompt_bytes} bytes "
                                    "(DF_MAX_PROMPT_BYTES)")


def mpx_steps(spec: JobSpec) -> float:
    """The work a job asks of the DiT: megapixel-frames times steps."""
    return spec.megapixel_frames * spec.steps


def check_work(spec: JobSpec, limits: LimitSettings) -> None:
    work = mpx_steps(spec)
    if work > limits.max_job_mpx_steps:
        raise LimitError(None, f"the job asks for {spec.width}x{spec.height} x {spec.frames} frame(s) x {spec.steps} "
                               f"steps = {work:g} megapixel-frame-steps, over the limit of {limits.max_job_mpx_steps:g} "
                               "(DF_MAX_JOB_MPX_STEPS)")


def check_predicted(spec: JobSpec, limits: LimitSettings, predict: Callable[[JobSpec], float] | None) -> None:
    """``predict``: the job's seconds over every stage by its model's cost profile (None: no profile)."""
    if predict is None or math.isinf(limits.max_job_seconds):
        return
    seconds = predict(spec)
    if seconds > limits.max_job_seconds:
        raise LimitError(None, f"the job is predicted to take {seconds:.1f} s by its model's cost profile, over the "
                               f"limit of {limits.max_job_seconds:g} s (DF_MAX_JOB_SECONDS)")


def check_job(spec: JobSpec, limits: LimitSettings, predict: Callable[[JobSpec], float] | None = None) -> None:
    """Raise LimitError if ``spec`` asks for more than the limits allow (bytes first: cheap)."""
    check_prompt_bytes(spec, limits)
    check_work(spec, limits)
    check_predicted(spec, limits, predict)


def check_tokens(field: str, count: int, limit: int) -> None:
    """A prompt of ``count`` tokens (by the model's tokenizer) against ``limit``."""
    if count > limit:
        raise LimitError(field, f"{count} tokens is longer than the limit of {limit} tokens (DF_MAX_PROMPT_TOKENS, "
                                "or the model's own text length when that is 0)")


# ------------------------------------------------------------------ deadlines


def deadline_s(spec: JobSpec, limits: LimitSettings) -> float | None:
    """Seconds after submission a job has: its own, at most the deployment's; None: no deadline."""
    own = spec.deadline_s or math.inf
    most = limits.job_deadline_s or math.inf
    chosen = min(own, most)
    return None if math.isinf(chosen) else chosen


def check_deadline(task: StageTask, limits: LimitSettings, where: str, now: float | None = None) -> None:
    """Raise LimitError if ``task``'s job is past its deadline; ``where`` says at what point."""
    allowed = deadline_s(task.job, limits)
    if allowed is None:
        return
    age = (now or time.time()) - task.submitted_at
    if age > allowed:
        raise LimitError("deadline_s", f"the job passed its deadline of {allowed:g} s after submission "
                                       f"({age:.1f} s {where})")


def stop_when_late(tasks: Sequence[StageTask], limits: LimitSettings,
                   on_step: Callable[[int, int], None]) -> Callable[[int, int], None]:
    """A denoising step callback that does ``on_step``, then stops the loop (raises LimitError)
    once every job of the batch is past its deadline. While one job still has time the batch
    runs on; the late ones are answered when it ends (``check_deadline``)."""
    deadlines = [deadline_s(task.job, limits) for task in tasks]
    if any(d is None for d in deadlines):
        return on_step
    ends = [task.submitted_at + d for task, d in zip(tasks, deadlines)]
    distinct = sorted(set(deadlines))
    which = f"{distinct[0]:g} s" if len(distinct) == 1 else f"one of {', '.join(f'{d:g}' for d in distinct)} s, as every job of its batch"

    def checked(step: int, total: int) -> None:
        on_step(step, total)
        if step < total and time.time() > max(ends):
            raise LimitError("deadline_s", f"the job passed its deadline of {which} after submission "
                                           f"(stopped at step {step} of {total})")

    return checked


# ------------------------------------------------------------------ the queue


async def entry_backlog(js: JetStreamContext) -> int:
    """Tasks in DF_WORK for the entry stage, over every model: queued or being encoded."""
    info = await js.stream_info(WORK_STREAM, subjects_filter=work_subject(Stage.ENCODE, ">"))
    return sum((info.state.subjects or {}).values())


async def check_queue_depth(js: JetStreamContext, settings: BusSettings, adding: int) -> None:
    """Raise QueueFull if ``adding`` more jobs would take the entry backlog past ``max_queue_depth``."""
    limit = settings.max_queue_depth
    if not limit:
        return
    backlog = await entry_backlog(js)
    if backlog + adding > limit:
        raise QueueFull(f"the queue holds {backlog} jobs waiting to start and takes at most {limit} "
                        f"(DF_MAX_QUEUE_DEPTH): {adding} more do not fit; retry later")


_STREAM_FULL_CODES = {10077, 10078}
"""JetStream's "maximum messages exceeded" and "maximum bytes exceeded": a stream with discard
policy ``new`` that is full refuses the publish."""


def stream_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a publish refused by a full stream (it passes as the stream drains)."""
    return isinstance(exc, nats.js.errors.APIError) and (
        exc.err_code in _STREAM_FULL_CODES or "maximum messages" in str(exc.description or "")
        or "maximum bytes" in str(exc.description or "")
    )


# ------------------------------------------------------------------ at a stage


def profile_predictor(profiles_dir: Path) -> Callable[[JobSpec], float] | None:
    """A job's predicted seconds over every stage, by the cost profile of its model in
    ``profiles_dir`` (0 for a model without one); None when no profile can be read."""
    try:
        profiles = {profile.model: profile for profile in load_profiles([profiles_dir]).values()}
    except (OSError, ValueError) as exc:
        log.warning("no cost profiles for DF_MAX_JOB_SECONDS in %s: %s", profiles_dir, exc)
        return None

    def predict(spec: JobSpec) -> float:
        profile = profiles.get(spec.model)
        return sum(profile.job_seconds(spec).values()) if profile else 0.0

    return predict


class Admission:
    """What a stage checks of every task it takes, before any work: the job's limits at the entry
    stage (the first to see it), the deadline at every stage."""

    def __init__(self, stage: Stage, settings: Settings):
        self.stage = stage
        self.settings = settings
        self._predict = None if math.isinf(settings.max_job_seconds) else profile_predictor(settings.profiles_dir)

    def check(self, task: StageTask) -> None:
        if self.stage == Stage.ENCODE:
            check_job(task.job, self.settings, self._predict)
        check_deadline(task, self.settings, f"when stage {self.stage} took it")
