"""The rules a stage worker decides by, as pure functions: which jobs share a batch, and when a
busy worker takes its next job. The live worker (``disagfusion.worker``) and the scheduler's
simulation of a fleet of them (``services/scheduler/simulation.py``) both call these, with
limits read from the same settings, so the simulation runs the fleet a deployment runs.

Which jobs may share a batch at all is the stage service's to say (``BatchKey``): the encoder
batches any prompts of one model, the DiT and the decoder only jobs of one shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from disagfusion.config import WorkerSettings
from disagfusion.protocol import JobSpec

BatchKey = Callable[[JobSpec], Hashable]
"""Jobs with equal keys may share a batch."""


def by_shape(spec: JobSpec) -> Hashable:
    """One model, size, frame count, step count and guidance: what a DiT or VAE batch needs."""
    return spec.shape_key


def by_model(spec: JobSpec) -> Hashable:
    """Any prompts of one model: a text encoder pads every prompt to one length."""
    return spec.model


@dataclass(frozen=True)
class WorkerLimits:
    """How much one worker takes on: its batch limits and how far it fetches ahead."""

    max_batch: int = 1
    max_batch_mpx: float = math.inf
    """Megapixel-frames a batch may hold; a first job larger than this still runs, alone."""
    holds: int = 0
    """Jobs it may hold besides the batch computing (fetched ahead, or carried to a later batch)."""
    fetch_ahead_s: float = math.inf
    """A busy worker takes the next job only once the work in its hands is done within this."""

    @classmethod
    def of(cls, settings: WorkerSettings) -> WorkerLimits:
        """The limits a stage service with these settings works by."""
        return cls(
            max_batch=settings.max_batch,
            max_batch_mpx=settings.max_batch_mpx,
            holds=settings.jobs_in_flight - settings.max_batch,
            fetch_ahead_s=settings.fetch_ahead_s,
        )


def pull_size(limits: WorkerLimits, like: JobSpec | None) -> int:
    """How many tasks one pull asks for: a batch's worth of jobs like ``like``, the last job the
    worker took. JetStream hands over the next tasks whatever their size, and a task that
    cannot join the batch waits in this worker while another might start it, so a worker
    serving videos under ``max_batch_mpx`` pulls them one at a time, and one that has taken no
    job yet (None) pulls one to learn the size."""
    if like is None:
        return 1
    if limits.max_batch * like.megapixel_frames <= limits.max_batch_mpx:
        return limits.max_batch
    return max(1, math.floor(limits.max_batch_mpx / like.megapixel_frames))


def fits(batch: Sequence[JobSpec], candidate: JobSpec, key: BatchKey, limits: WorkerLimits) -> bool:
    """Whether ``candidate`` may join ``batch`` (non-empty): the same key, and room for it."""
    if len(batch) >= limits.max_batch or key(candidate) != key(batch[0]):
        return False
    return sum(spec.megapixel_frames for spec in batch) + candidate.megapixel_frames <= limits.max_batch_mpx


T = TypeVar("T")


def split_batch(jobs: Sequence[T], spec_of: Callable[[T], JobSpec], key: BatchKey,
                limits: WorkerLimits) -> tuple[list[T], list[T]]:
    """The next batch from ``jobs`` (in the order they came: the first always runs) and the rest,
    in order, for later batches."""
    batch: list[T] = []
    rest: list[T] = []
    for job in jobs:
        if not batch or fits([spec_of(j) for j in batch], spec_of(job), key, limits):
            batch.append(job)
        else:
            rest.append(job)
    return batch, rest


def seconds_in_hand(running_left_s: float, waiting: Iterable[JobSpec], estimate: Callable[[JobSpec], float]) -> float:
    """How long until a worker has done what it holds: the rest of the batch running and each
    job waiting for it, as ``estimate`` (infinite for a shape it has not run yet) says."""
    return running_left_s + sum(estimate(spec) for spec in waiting)


def may_fetch_ahead(seconds_in_hand: float, limits: WorkerLimits) -> bool:
    """A busy worker takes its next job only in the last ``fetch_ahead_s`` of the work in hand:
    a job taken earlier waits behind it while another instance might idle."""
    return seconds_in_hand <= limits.fetch_ahead_s
