"""The worker's rules as pure functions: which jobs share a batch, when a busy worker fetches."""

from __future__ import annotations

import math

from disagfusion.config import WorkerSettings
from disagfusion.protocol import JobSpec
from disagfusion.worker.policy import (
    WorkerLimits,
    by_model,
    by_shape,
    fits,
    may_fetch_ahead,
    pull_size,
    seconds_in_hand,
    split_batch,
)


def job(n: int, size: int = 64, prompt: str = "p") -> JobSpec:
    return JobSpec(job_id=f"j{n}", prompt=prompt, height=size, width=size)


def ids(jobs: list[JobSpec]) -> list[str]:
    return [j.job_id for j in jobs]


def same(spec: JobSpec) -> JobSpec:
    return spec


def test_a_batch_takes_the_first_job_and_those_of_its_shape_up_to_the_limit() -> None:
    jobs = [job(0), job(1, size=128), job(2), job(3), job(4)]
    batch, rest = split_batch(jobs, same, by_shape, WorkerLimits(max_batch=3))
    assert ids(batch) == ["j0", "j2", "j3"]
    assert ids(rest) == ["j1", "j4"]  # in the order they came, for the batches after


def test_the_encoder_rule_batches_any_prompts_of_a_model() -> None:
    jobs = [job(0, prompt="short"), job(1, size=128, prompt="a much longer prompt")]
    assert ids(split_batch(jobs, same, by_model, WorkerLimits(max_batch=4))[0]) == ["j0", "j1"]
    assert ids(split_batch(jobs, same, by_shape, WorkerLimits(max_batch=4))[0]) == ["j0"]


def test_megapixels_bound_a_batch_but_a_large_first_job_still_runs() -> None:
    limits = WorkerLimits(max_batch=8, max_batch_mpx=1.0)
    images = [job(n, size=512) for n in range(6)]  # 0.26 megapixels each
    assert len(split_batch(images, same, by_shape, limits)[0]) == 3
    huge = [job(n, size=2048) for n in range(2)]  # 4.2 each
    batch, rest = split_batch(huge, same, by_shape, limits)
    assert ids(batch) == ["j0"] and ids(rest) == ["j1"]
    assert not fits([images[0]], huge[0], by_shape, limits)


def test_limits_come_from_the_settings_a_deployment_uses() -> None:
    limits = WorkerLimits.of(WorkerSettings(max_batch=4, max_in_flight=4, fetch_ahead_s=2.0, max_batch_mpx=8.0))
    assert limits == WorkerLimits(max_batch=4, max_batch_mpx=8.0, holds=4, fetch_ahead_s=2.0)  # two batches in flight
    assert WorkerLimits.of(WorkerSettings(pipeline="sync")).holds == 0


def test_a_busy_worker_fetches_only_in_the_last_seconds_of_its_work() -> None:
    limits = WorkerLimits(fetch_ahead_s=1.0)
    timed = {"j1": 0.5}

    def estimate(spec: JobSpec) -> float:
        return timed.get(spec.job_id, math.inf)

    assert seconds_in_hand(0.3, [job(1)], estimate) == 0.8
    assert may_fetch_ahead(seconds_in_hand(0.3, [job(1)], estimate), limits)
    assert not may_fetch_ahead(seconds_in_hand(0.6, [job(1)], estimate), limits)
    assert seconds_in_hand(0.0, [job(2)], estimate) == math.inf  # a shape not run yet: endless


def test_a_pull_asks_for_a_batch_of_jobs_like_the_last_one() -> None:
    limits = WorkerLimits(max_batch=8, max_batch_mpx=4.0)
    assert pull_size(limits, None) == 1  # nothing taken yet: one, to learn the size
    assert pull_size(limits, job(0, size=512)) == 8  # 0.26 megapixels: a full batch
    assert pull_size(limits, job(0, size=1024)) == 3  # 1.05 each: three fit 4 megapixels
    assert pull_size(limits, JobSpec(prompt="v", height=480, width=832, frames=33)) == 1  # a video alone
    assert pull_size(WorkerLimits(max_batch=2), job(0)) == 2  # no megapixel bound at all
