"""Resumable denoising: where a stock pipeline's denoising loop stands after a step, as tensors
per job, and a later run of the same loop that starts there instead of at step 0.

A family's ``denoise`` calls the stock pipeline, whose loop keeps its state in two places: the
latents it carries from step to step, and the scheduler (its step index and, for a multistep
solver such as PixArt's DPM-Solver++, the model outputs of the last steps). ``DenoiseRun``
watches both for the length of one call, by wrapping the scheduler's ``set_timesteps`` and
``step`` on the instance, so no family codes its loop twice:

- ``capture()`` (from the step callback) gives each job's latents and its rows of the
  scheduler's stepping state, plus the shared scalars, named ``resume.*``;
- given such tensors at the start, the run feeds the latents to the pipeline
  (``start_arguments``, through ``family.denoise_arguments``), lets the scheduler compute its
  whole schedule as usual, restores the stepping state, and shows the pipeline only the
  timesteps left, so the loop runs the remaining steps with the arithmetic of an uninterrupted
  run: the result is bitwise equal to it (for the same batch composition: a batch rounds
  differently from each of its jobs alone, within 1/255 of a pixel).

Only deterministic schedulers are resumable (``supported``): one that draws noise each step
(an SDE solver, stochastic sampling) would need its generators' states too.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch

from disagfusion.models.base import StepCallback, Tensors

PREFIX = "resume."
"""Names of the resume tensors among a job's denoise inputs."""

STEP = f"{PREFIX}step"
LATENTS = f"{PREFIX}latents"

STEPPING_STATE = ("_step_index", "model_outputs", "lower_order_nums", "timestep_list", "last_sample", "this_order")
"""The scheduler attributes a step changes (those a scheduler lacks are skipped); everything
else it holds, ``set_timesteps`` recomputes from the job's spec."""


def supported(scheduler: Any) -> bool:
    """Whether a run with ``scheduler`` can be checkpointed and resumed bitwise."""
    name, config = type(scheduler).__name__, scheduler.config
    if name == "DPMSolverMultistepScheduler":
        return not str(config.algorithm_type).startswith("sde")
    if name == "FlowMatchEulerDiscreteScheduler":
        return not config.get("stochastic_sampling", False)
    return False


_local = threading.local()


def current() -> DenoiseRun | None:
    """The run under way in this thread (the compute thread during a denoise call), if any."""
    return getattr(_local, "run", None)


def split(inputs: list[Tensors]) -> tuple[list[Tensors], list[Tensors] | None]:
    """A batch's inputs without the resume tensors, and those (None when no job resumes)."""
    plain = [{k: v for k, v in job.items() if not k.startswith(PREFIX)} for job in inputs]
    starts = [{k: v for k, v in job.items() if k.startswith(PREFIX)} for job in inputs]
    if not any(starts):
        return plain, None
    if not all(starts) or len({int(start[STEP]) for start in starts}) != 1:
        raise ValueError("the jobs of a resumed denoise batch must all resume, at one step")
    return plain, starts


def start_step(tensors: Tensors) -> int:
    return int(tensors[STEP])


class DenoiseRun:
    """One denoise call of a batch, started at step 0 or at the checkpoint ``starts`` (one per
    job, all at one step). Use as a context manager around the family's ``denoise``."""

    def __init__(self, scheduler: Any, device: torch.device | str, starts: list[Tensors] | None = None):
        self.scheduler = scheduler
        self.device = device
        self.starts = starts
        self.begin = start_step(starts[0]) if starts else 0
        self.latents: torch.Tensor | None = None
        """What the scheduler's last step returned: the loop's latents now."""
        self._full_timesteps: torch.Tensor | None = None

    @property
    def resumable(self) -> bool:
        return supported(self.scheduler)

    def __enter__(self) -> DenoiseRun:
        scheduler = self.scheduler
        set_timesteps, step = scheduler.set_timesteps, scheduler.step

        # functools.wraps keeps the signature, which diffusers' retrieve_timesteps inspects.
        @functools.wraps(set_timesteps)
        def set_timesteps_then_restore(*args: Any, **kwargs: Any) -> Any:
            returned = set_timesteps(*args, **kwargs)
            if self.starts:
                self._restore()
                # The pipeline loops over what it reads here: the steps left. The scheduler gets
                # its whole schedule back at its first step (it counts in it: DPM-Solver's last
                # steps drop to a lower order by their distance from its end).
                self._full_timesteps = scheduler.timesteps
                scheduler.timesteps = scheduler.timesteps[self.begin:]
            return returned

        @functools.wraps(step)
        def step_and_watch(*args: Any, **kwargs: Any) -> Any:
            if self._full_timesteps is not None:
                scheduler.timesteps, self._full_timesteps = self._full_timesteps, None
            returned = step(*args, **kwargs)
            self.latents = returned[0] if isinstance(returned, tuple) else returned.prev_sample
            return returned

        scheduler.set_timesteps, scheduler.step = set_timesteps_then_restore, step_and_watch
        _local.run = self
        return self

    def __exit__(self, *exc: object) -> None:
        _local.run = None
        del self.scheduler.set_timesteps, self.scheduler.step  # the class's methods again

    def start_arguments(self) -> dict[str, torch.Tensor]:
        """The pipeline arguments of a resumed run: its latents, as the checkpoint left them."""
        if not self.starts:
            return {}
        return {"latents": torch.cat([start[LATENTS] for start in self.starts]).to(self.device)}

    def offset(self, on_step: StepCallback) -> StepCallback:
        """``on_step`` counting in the whole run: the loop of a resumed run counts from 0."""
        if not self.begin:
            return on_step
        return lambda step, total: on_step(self.begin + step, total)

    # ------------------------------------------------------------------ the state

    def capture(self) -> list[Tensors] | None:
        """Each job's checkpoint now (between two steps): its latents and its scheduler state,
        as new CPU tensors; None if this run cannot be resumed or has not stepped yet."""
        if not self.resumable or self.latents is None:
            return None
        jobs = self.latents.shape[0]
        shared: Tensors = {}
        rows: dict[str, torch.Tensor] = {LATENTS: self.latents}
        for attr in STEPPING_STATE:
            if not hasattr(self.scheduler, attr):
                continue
            value = getattr(self.scheduler, attr)
            if isinstance(value, list):
                shared[f"{PREFIX}{attr}:len"] = torch.tensor(len(value))
                items = [(f"{PREFIX}{attr}.{i}", item) for i, item in enumerate(value)]
            else:
                items = [(f"{PREFIX}{attr}", value)]
            for name, item in items:
                if item is None:  # absent: restored as None
                    continue
                if isinstance(item, int):
                    shared[f"{name}:int"] = torch.tensor(item)
                elif item.dim() and item.shape[0] == jobs:  # a batch tensor: each job its row
                    rows[f"{name}:job"] = item
                else:
                    shared[f"{name}:all"] = item
        copy = functools.partial(torch.Tensor.to, device="cpu", copy=True)
        return [
            {STEP: torch.tensor(self.scheduler._step_index)}
            | {name: copy(t) for name, t in shared.items()}
            | {name: copy(t[i : i + 1]) for name, t in rows.items()}
            for i in range(jobs)
        ]

    def _restore(self) -> None:
        first = self.starts[0]
        values: dict[str, Any] = {}
        for name, tensor in first.items():
            if name in (STEP, LATENTS):
                continue
            key, kind = name.removeprefix(PREFIX).rsplit(":", 1)
            if kind == "int" or kind == "len":
                values[key if kind == "int" else f"{key}:len"] = int(tensor)
            elif kind == "all":
                values[key] = tensor.to(self.device)
            else:  # "job": the batch's rows, in the batch's order
                values[key] = torch.cat([start[name] for start in self.starts]).to(self.device)
        for attr in STEPPING_STATE:
            if f"{attr}:len" in values:
                setattr(self.scheduler, attr, [values.get(f"{attr}.{i}") for i in range(values[f"{attr}:len"])])
            elif hasattr(self.scheduler, attr):
                setattr(self.scheduler, attr, values.get(attr))
