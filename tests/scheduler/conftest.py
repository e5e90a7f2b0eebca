"""Shared pieces of the scheduler tests: the repository's cost profiles and job builders."""

from __future__ import annotations

import pytest

from disagfusion.config import SHIPPED_PROFILES_DIR
from disagfusion.cost import CostProfile, load_profiles
from disagfusion.protocol import JobSpec
from services.scheduler.config import SchedulerSettings
from services.scheduler.trace import TraceEntry


@pytest.fixture(scope="session")
def profile_files() -> dict[str, CostProfile]:
    """The shipped profiles by file name."""
    return load_profiles([SHIPPED_PROFILES_DIR])


@pytest.fixture(scope="session")
def profiles(profile_files: dict[str, CostProfile]) -> list[CostProfile]:
    return list(profile_files.values())


@pytest.fixture
def settings() -> SchedulerSettings:
    return SchedulerSettings(
        tick_s=5.0, horizon_s=60.0, stabilisation_s=60.0, startup_s={"encode": 10.0, "denoise": 20.0, "decode": 10.0}
    )


def small_image(n: int, **fields) -> JobSpec:
    return JobSpec(job_id=f"img-{n}", model="image", prompt="a harbour at dawn", height=512, width=512, steps=20, **fields)


def video(n: int) -> JobSpec:
    return JobSpec(job_id=f"vid-{n}", model="wan2_1-t2v-1_3b", prompt="a harbour at dawn", height=480, width=832, frames=33, steps=30)


def steady(make, rate: float, start: float, end: float, phase: str | None = None, offset: int = 0) -> list[TraceEntry]:
    """Evenly spaced arrivals: deterministic load without Poisson noise."""
    n = int((end - start) * rate)
    return [TraceEntry(t=start + k / rate, spec=make(offset + k), phase=phase) for k in range(n)]
