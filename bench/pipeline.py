"""Emulated pipeline throughput: async (overlapped) vs sync stage workers under handoff delays.

    .venv/bin/python bench/pipeline.py [--quick]

Runs the real services of compose.yaml through the embedded launcher (real nats-server,
real shm handoffs of real-sized tensors, one process per instance) serving the ``emulated``
model family, whose stages hold an emulated accelerator for the time its cost profile gives:
encoder 20 ms, dit 200 ms, decoder 50 ms per job (deploy/profiles/bench-pipeline.yaml). Only
the kernel time is emulated; queueing, transfers and batching are real. For each handoff
delay (0, 50 ms, 50±40 ms uniform, injected into every stage-to-stage handoff) and each
worker mode (DF_PIPELINE=async or sync), a backlog of jobs is submitted at once and the
throughput measured over the middle half of the results (steady state, no fill or drain). The bound is the bottleneck stage's
capacity: instances ÷ per-job cost of the slowest stage. Prints a table, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from disagfusion.client import Client
from disagfusion.cost import CostProfile
from disagfusion.launcher import Launcher
from disagfusion.machine import describe
from disagfusion.models import PROFILE_FILE, init_preset
from disagfusion.protocol import STAGES, JobSpec

DELAYS = [("0", 0.0, 0.0), ("50ms", 50.0, 0.0), ("50+-40ms", 50.0, 40.0)]
MODES = ["async", "sync"]

console = Console(stderr=True)


def bound(profile: CostProfile, spec: JobSpec, instances: dict[str, int]) -> float:
    """Jobs/s the slowest stage can sustain: its instances ÷ its per-job service time."""
    return min(instances[stage.service] / profile.seconds(stage, [spec]) for stage in STAGES)


async def measure(launcher: Launcher, specs: list[JobSpec]) -> float:
    """Submit every job at once; the steady-state rate, jobs/s over the middle half of the
    results (the first quarter fills the pipeline, the last quarter drains it)."""
    finished = []
    async with Client(launcher.client_settings()) as client:
        async for result in client.run_many(specs, timeout=120):
            if result.status != "ok":
                raise RuntimeError(f"job failed: {result.error}")
            finished.append(time.monotonic())
    lo, hi = len(finished) // 4, 3 * len(finished) // 4
    return (hi - lo) / (finished[hi] - finished[lo])


def run_config(models_dir: Path, work: Path, mode: str, delay: float, jitter: float,
               instances: dict[str, int], jobs: int) -> float:
    os.environ.update(DF_MODELS="emulated", DF_PIPELINE=mode, DF_HANDOFF_DELAY_MS=str(delay),
                      DF_HANDOFF_JITTER_MS=str(jitter))
    launcher = Launcher(work / f"{mode}-{delay}-{jitter}", models_dir=models_dir)
    launcher.up(instances)
    try:
        warmup = [JobSpec(model="emulated", prompt="warm-up", seed=i) for i in range(4)]
        asyncio.run(measure(launcher, warmup))
        specs = [JobSpec(model="emulated", prompt=f"job {i}", seed=i) for i in range(jobs)]
        return asyncio.run(measure(launcher, specs))
    finally:
        launcher.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs (under 2 minutes)")
    parser.add_argument("--jobs", type=int, help="jobs per configuration")
    parser.add_argument("--dit", type=int, default=2, help="dit instances")
    args = parser.parse_args()
    jobs = args.jobs or (32 if args.quick else 120)
    instances = {"encoder": 1, "dit": args.dit, "decoder": 1}

    rows = []
    with tempfile.TemporaryDirectory(prefix="df-bench-pipeline-") as tmp:
        models_dir = Path(tmp) / "models"
        init_preset("emulated", models_dir / "emulated")
        profile = CostProfile.load(models_dir / "emulated" / PROFILE_FILE)
        limit = bound(profile, JobSpec(model="emulated", prompt="x"), instances)
        for label, delay, jitter in DELAYS:
            for mode in MODES:
                console.print(f"{mode} with handoff delay {label}: {jobs} jobs ...")
                throughput = run_config(models_dir, Path(tmp), mode, delay, jitter, instances, jobs)
                rows.append({"mode": mode, "delay": label, "throughput": round(throughput, 3),
                             "bound": round(limit, 3), "efficiency": round(throughput / limit, 3),
                             "jobs": jobs, "instances": instances})

    table = Table("mode", "handoff delay", "jobs/s", "bound", "efficiency",
                  title="emulated pipeline throughput (encoder 20 ms, dit 200 ms, decoder 50 ms per job)")
    for row in rows:
        table.add_row(row["mode"], row["delay"], f"{row['throughput']:.2f}", f"{row['bound']:.2f}",
                      f"{row['efficiency']:.3f}")
    console.print(table)
    print(json.dumps({
        "bench": "pipeline_emulated",
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": describe(),
        "profile": "deploy/profiles/bench-pipeline.yaml (synthetic)",
        "rows": rows,
    }))


if __name__ == "__main__":
    main()
