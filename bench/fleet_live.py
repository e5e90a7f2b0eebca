"""The fleet comparison run LIVE on the emulated accelerator (``bench/fleet.py --live``): the
real services (nats-server, shm handoffs, one process per slot) on uniform pools of emulated
slots, each stage sleeping the time the scenario's simulation gives it.

Per scenario and mode, a stack of ``slots`` processes serves one emulated model written for it
(data only, no service change):

- disaggregated: encoder, dit and decoder processes split in proportion to the stage times of
  the scenario's job (largest remainders, at least one each: ``split``); each stage's per-job
  time is the simulation's on the pool's device class;
- monolithic: ``slots`` pipeline processes; each stage's per-job time is what the monolithic
  plan (services/scheduler/monolithic.py) gives a device of the class, offload included
  (``MonolithicDevice.stage_seconds``): an offloaded encoder's weight transfer is in its encode
  time.

Jobs carry small tensors (a 64x64 image, a short embedding): the stage time is the scenario
job's, baked into the profile per job, so queueing, messaging, handoffs and process counts are
real while kernel time and tensor bytes are emulated. Time runs ``speed`` times faster
(DF_EMULATED_SPEED). Both modes get the same seeded Poisson arrivals at the simulation's rate
times ``speed``, one job per batch (the simulated cost is linear in batch size, so batching
changes no capacity), one torch thread per process. Throughput and p95 are measured at the client
(bench/e2e.py's open loop) and reported in simulated-time units (divided by ``speed``) beside the
simulation's.
"""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from disagfusion.config import Settings
from disagfusion.cost import CostProfile
from disagfusion.launcher import Launcher
from disagfusion.memory import fleet_memory
from disagfusion.models.emulated import EmulatedGeometry, write_model
from disagfusion.protocol import STAGES, JobSpec
from e2e import open_loop, summarise
from services.scheduler.monolithic import Offload, monolithic_devices
from services.scheduler.pool import Pool
from services.scheduler.predictor import Predictor

SERVICE = {"encode": "encoder", "denoise": "dit", "decode": "decoder"}
LIVE_GEOMETRY = EmulatedGeometry(text_dim=64, max_sequence_length=32, latent_channels=4, vae_scale_factor=8,
                                 patch_size=2)
"""Small tensors: the live run emulates the kernel time, not the bytes (see the module docstring)."""
LIVE_SEED = 7
"""Seed of the live runs' Poisson arrivals (bench/fleet.py simulates the same ones)."""
LIVE_JOB = dict(width=64, height=64, frames=1, steps=4, guidance=1.0)


@dataclass(frozen=True)
class LiveRun:
    scenario: str
    """The simulated scenario's label (emulated-...)."""
    slots: int
    speed: float
    """DF_EMULATED_SPEED: live seconds are simulated seconds / speed."""
    jobs: int
    rate: float
    """Simulated arrivals per second (the simulation's saturated or half rate)."""
    load: str


def split(seconds: dict[str, float], slots: int) -> dict[str, int]:
    """Slots per stage in proportion to its seconds per job: at least one each, the rest by
    largest remainder."""
    total = sum(seconds.values())
    counts = {s: max(1, math.floor(slots * seconds[s] / total)) for s in STAGES}
    while sum(counts.values()) > slots:
        counts[max(counts, key=counts.get)] -= 1
    order = sorted(STAGES, key=lambda s: slots * seconds[s] / total - math.floor(slots * seconds[s] / total), reverse=True)
    for stage in order[: slots - sum(counts.values())]:
        counts[stage] += 1
    return counts


def stage_seconds(profile: CostProfile, job: dict, prompt: str, pool: Pool, offload: Offload) -> dict[str, dict[str, float]]:
    """Per mode, each stage's seconds of the scenario's job on the pool's (uniform) device class."""
    if len(pool.classes) != 1:
        raise ValueError("the live run takes uniform pools only")
    settings = Settings(models_dir=Path("/nonexistent"))
    needs = fleet_memory([profile.model], [profile], settings)
    truth = Predictor([profile])
    spec = JobSpec(job_id="probe", model=profile.model, prompt=prompt, **job)
    speed = pool.classes[0].speed
    return {"disaggregated": {s: c / speed for s, c in zip(STAGES, truth.job_costs(spec))},
            "monolithic": monolithic_devices(pool, needs)[0].stage_seconds(spec, truth, needs, offload)}


def live_profile(name: str, seconds: dict[str, float], source: str) -> CostProfile:
    return CostProfile.model_validate({
        "model": name, "hardware": "emulated slot", "kind": "synthetic", "source": source,
        "stages": {s: {"per_job_s": seconds[s]} for s in STAGES},
    })


def run_live(run: LiveRun, seconds: dict[str, dict[str, float]], offloaded: list[str], console: Console) -> list[dict]:
    """Both modes of one scenario, one after the other, on ``run.slots`` processes each."""
    rows = []
    live_rate = run.rate * run.speed
    with tempfile.TemporaryDirectory(prefix="df-fleet-live-") as tmp:
        models_dir = Path(tmp) / "models"
        for mode in ("disaggregated", "monolithic"):
            name = f"{run.scenario.removeprefix('emulated-').replace('.', '_')}-{mode[:4]}"
            note = (f"{run.scenario} {mode}: per-job stage seconds of the simulated job on one slot"
                    + (f", offload of {', '.join(offloaded)} included" if mode == "monolithic" and offloaded else ""))
            write_model(models_dir / name, LIVE_GEOMETRY, live_profile(name, seconds[mode], note))
            scales = ({SERVICE[s]: n for s, n in split(seconds[mode], run.slots).items()} if mode == "disaggregated"
                      else {"pipeline": run.slots})
            scales["gateway"] = 0
            os.environ.update(DF_MODELS=name, DF_TORCH_THREADS="1", DF_MAX_BATCH="1",
                              DF_EMULATED_SPEED=str(run.speed))
            launcher = Launcher(Path(tmp) / mode, models_dir=models_dir, monolithic=mode == "monolithic")
            console.print(f"  live {run.scenario} {mode}: starting {scales} ...")
            launcher.up(scales, timeout=300)
            try:
                specs = [JobSpec(model=name, prompt=f"emulated live job {k}", seed=k, **LIVE_JOB) for k in range(run.jobs)]
                per_job = sum(seconds[mode].values())
                capacity = run.slots / per_job if mode == "monolithic" else min(
                    n / seconds[mode][s] for s, n in split(seconds[mode], run.slots).items())
                measured = summarise(specs, asyncio.run(open_loop(launcher, specs, live_rate, LIVE_SEED, timeout=600)),
                                     capacity * run.speed)
            finally:
                launcher.down()
            load = os.getloadavg()[0]
            row = {"scenario": run.scenario, "mode": mode, "source": "emulated-live", "load": run.load,
                   "rate": round(run.rate, 6), "jobs": run.jobs, "slots": run.slots, "speed": run.speed,
                   "scales": {k: v for k, v in scales.items() if v},
                   "stage_s": {s: round(v, 3) for s, v in seconds[mode].items()},
                   "throughput": round(measured["throughput"] / run.speed, 6),
                   "p50_s": round(measured["p50_s"] * run.speed, 2), "p95_s": round(measured["p95_s"] * run.speed, 2),
                   "completed": measured["completed"], "failed": len(measured["failed"]),
                   "capacity_estimate": round(capacity, 6), "live_throughput": measured["throughput"],
                   "live_p95_s": measured["p95_s"], "load_1m": round(load, 2)}
            console.print(f"  live {run.scenario} {mode}: {row['completed']}/{run.jobs} ok, {row['throughput']:.4g} jobs/s, "
                          f"p95 {row['p95_s']:.4g} s (emulated, simulated-time units; load {load:.2f})")
            rows.append(row)
    return rows
