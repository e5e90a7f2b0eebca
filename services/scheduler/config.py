"""The scheduler's settings, read from ``DF_SCHED_*`` so compose.yaml, the launcher and a shell
configure it the same way."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from disagfusion.protocol import STAGES

class SchedulerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DF_SCHED_", extra="ignore")

    policy: Literal["hybrid", "predictor", "lag", "threshold", "static"] = "hybrid"
    actuator: Literal["dry-run", "local", "compose", "kubernetes"] = "dry-run"
    pool: str = "slot:12"
    """Device classes and their counts, e.g. ``h100:64,l4:256`` (see services/scheduler/pool.py)."""

    tick_s: float = Field(default=5.0, gt=0)
    horizon_s: float = Field(default=60.0, gt=0)
    """Backlog is sized to drain within this long."""
    stabilisation_s: float = Field(default=90.0, ge=0)
    """A stage shrinks only once its lower target has held this long (no flapping)."""
    target_utilisation: float = Field(default=0.85, gt=0, le=1)
    """Steady-state arrivals are provisioned at this utilisation, leaving headroom for bursts."""
    startup_s: dict[str, float] = Field(default_factory=lambda: {"encode": 20.0, "denoise": 30.0, "decode": 15.0})
    """Seconds from asking for an instance to its first pull (image start, weight load)."""
    min_instances: dict[str, int] = Field(default_factory=lambda: {s: 1 for s in STAGES})
    max_instances: dict[str, int] = Field(default_factory=dict)
    """Per-stage ceilings; a stage missing here is bounded only by the pool."""
    fill_pool: bool = True
    """Hand spare slots out in the demand ratio (a fixed fleet) rather than leaving them free
    (a cloud fleet paying per instance)."""
    deadline_aware: bool = True
    """Drain each queued job by its latency budget (``latency_budget`` × its service time) when
    that is longer than the horizon, so a backlog of long video jobs does not take slots from
    new short jobs with tight budgets."""
    switch_margin: float = Field(default=0.0, ge=0, lt=1)
    """A new placement replaces the last one only if it serves the most short stage (capacity
    over need) this much better: hysteresis against flipping an instance every tick."""
    latency_budget: float = Field(default=5.0, gt=0)
    arrival_tau_s: float = Field(default=20.0, gt=0)
    """Time constant of the arrival-rate average: shorter follows shifts faster, longer is calmer."""

    lag_threshold: int = Field(default=10, ge=1)
    """The lag-only policy's KEDA ``lagThreshold`` (KEDA's JetStream scaler default)."""
    threshold_cooldown_s: float = Field(default=30.0, ge=0)

    k8s_namespace: str = "disagfusion"
    k8s_deployment: str = "{service}-{device}"
    """Deployment name per (stage, device class); ``{service}`` alone for a single-class pool."""
