"""EMULATED live comparison of scaling policies under a four-phase workload shift, against the
same trace in the scheduler's simulation.

Live: for each policy a fresh embedded stack (launcher: real nats-server, redis-server and
encoder/dit/decoder processes from compose.yaml) serves the emulated model ``emulated-elastic``
while the scheduler service (``python -m services.scheduler``, compose profile ``scheduler``)
scales it through the local actuator on a pool of 12 slots (one slot = one emulated
accelerator = one stage process). The bench submits the trace's jobs at their arrival times and
times every result. Kernel time is emulated (each stage sleeps for its profiled time); queues,
transfers, process start-up, draining and the scheduler are real. Nothing ran on a GPU.

The four phases keep bench/traces.py's shapes (DiT-bound small images, decoder-heavy large
images, long DiT "video" jobs, encoder-bound long prompts) at sizes this 2-core machine can move
(256-512 px, 9 frames) and with a synthetic cost profile (``ELASTIC_PROFILE``, not a
measurement) under which each phase is bound by another stage. Time constants of the scheduler
are shortened to fit phases of tens of seconds (``SCHEDULER_ENV``); the simulation gets the same.

Policies: static (the oracle's phase-1 allocation), lag, threshold, predictor, hybrid, and
oracle (the planner's best static allocation per phase, found by search in simulation and set
live at each phase start through scheduler pins). Per policy and phase: throughput, p95_s, slo
(latency within 5x the unloaded time). Simulated vs live throughput agreement is reported for
every policy run live; the simulation runs the fleet as it runs here (batches of one, the jobs
each worker fetches ahead, start-up sharing the machine's two cores) and its figures are the
mean of ``--sim-seeds`` simulations of the trace.

Reproduce: PYTHONPATH=. python bench/elastic.py [--quick] [--phase-s 30] [--policies hybrid,static]
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import nats
from rich.console import Console
from rich.table import Table

from disagfusion.client import Client
from disagfusion.config import Settings
from disagfusion.cost import CostProfile, StageCost
from disagfusion.launcher import Launcher
from disagfusion.models.emulated import PIXART_SIGMA_GEOMETRY, write_model
from disagfusion.protocol import JobSpec, Result, unpack
from disagfusion.scheduler_state import read_status, update_pins
from services.scheduler.config import SchedulerSettings
from services.scheduler.planner import oracle_schedule, phase_metrics, simulate
from services.scheduler.policies import Scheduled, make_policy
from services.scheduler.pool import Allocation, parse_pool, per_stage
from services.scheduler.predictor import Predictor
from services.scheduler.simulation import JobRecord, SharedStartup, deployed_workers
from services.scheduler.trace import TraceEntry

BENCH = Path(__file__).resolve().parent
MODEL = "emulated-elastic"
POOL = "slot:12"
POLICIES = ["static", "lag", "threshold", "predictor", "hybrid", "oracle"]
ELASTIC_PROFILE = CostProfile(
    model=MODEL,
    hardware="emulated slot (synthetic)",
    source="synthetic for bench/elastic.py: chosen so each of the four phases is bound by a different stage; not a measurement",
    kind="synthetic",
    stages={
        "encode": StageCost(per_job_s=0.1, per_ktoken_s=2.0, cfg_factor=2.0),
        "denoise": StageCost(per_mpixel_s=0.6, per_step=True, cfg_factor=2.0),
        "decode": StageCost(per_job_s=0.04, per_mpixel_s=4.0),
    },
)
PHASES = [
    ("1-small-images", dict(height=256, width=256, steps=20, guidance=5.0), 60),
    ("2-large-images", dict(height=512, width=512, steps=4, guidance=1.0), 60),
    ("3-video", dict(height=256, width=256, frames=9, steps=20, guidance=5.0), 120),
    ("4-long-prompts", dict(height=256, width=256, steps=2, guidance=1.0), 2000),
]
# Start-up as bench/startup.py measured it here (six stage processes at once, median of the last
# to report healthy); switch_margin damps the noisier arrival averages of 1 s ticks and 4 s tau.
SETTINGS = dict(tick_s=1.0, horizon_s=10.0, stabilisation_s=10.0, arrival_tau_s=4.0, threshold_cooldown_s=5.0,
                switch_margin=0.05, startup_s={"encode": 8.5, "denoise": 8.5, "decode": 8.5})
# How start-up behaves here, for the simulation: bench/startup.py measured one process alone
# ready in 1.5-1.9 s and six started at once all ready after 6.2 s (median), i.e. each needs about
# 2.1 s of one of the 2 cores (mostly importing torch), so ten at once take about 10 s.
SHARED_STARTUP = SharedStartup(alone_s=1.7, cpu_s=2.1, cores=2)


SCHEDULER_ENV = {
    "DF_SCHED_TICK_S": "1", "DF_SCHED_HORIZON_S": "10", "DF_SCHED_STABILISATION_S": "10",
    "DF_SCHED_ARRIVAL_TAU_S": "4", "DF_SCHED_THRESHOLD_COOLDOWN_S": "5", "DF_SCHED_SWITCH_MARGIN": "0.05",
    "DF_SCHED_STARTUP_S": json.dumps(SETTINGS["startup_s"]),
}


def trace(phase_s: float, load: float, seed: int, settings: SchedulerSettings) -> list[TraceEntry]:
    """Poisson arrivals per phase at ``load`` x what 12 slots serve of the phase's job at the
    best split (every stage given slots in proportion to its cost)."""
    rng = random.Random(seed)
    pool = parse_pool(POOL)
    truth = Predictor([ELASTIC_PROFILE])
    entries: list[TraceEntry] = []
    words = ["a", "quiet", "harbour", "at", "dawn", "with", "boats", "soft", "light", "mist"]
    for k, (label, fields, chars) in enumerate(PHASES):
        prompt = " ".join(rng.choice(words) for _ in range(chars))[:chars]
        costs = truth.job_costs(JobSpec(model=MODEL, prompt=prompt, **fields))
        rate = load * pool.total / sum(costs)
        t, start, n = k * phase_s, k * phase_s, 0
        while (t := t + rng.expovariate(rate)) < start + phase_s:
            entries.append(TraceEntry(t=round(t, 4), phase=label, spec=JobSpec(
                job_id=f"p{k + 1}-{n}", model=MODEL, prompt=prompt, seed=n, **fields)))
            n += 1
    return entries


def services_of(allocation: Allocation) -> dict[str, int]:
    return {s.service: n for s, n in per_stage(allocation).items()}


async def drive(launcher: Launcher, entries: list[TraceEntry], pins: list[tuple[float, Allocation]], drain_s: float,
                timeline: list[dict]) -> list[JobRecord]:
    """Submit each job at its time, pin the oracle's allocation at each phase start, and record
    when each result came back (seconds since the trace started) and, every 2 s, what the
    scheduler runs and wants (running/desired per service)."""
    records = {e.spec.job_id: JobRecord(spec=e.spec, arrived=e.t, phase=e.phase) for e in entries}
    settings = launcher.client_settings()
    nc = await nats.connect(settings.nats_url)
    started = time.time()

    async def on_result(msg) -> None:
        result = unpack(Result, msg.data)
        record = records.get(result.job_id)
        if record is not None and math.isnan(record.done):
            record.done = result.finished_at - started

    await nc.subscribe("df.results.>", cb=on_result)
    async with Client(settings) as client:
        async def pinner() -> None:
            for t, allocation in pins:
                await asyncio.sleep(max(0.0, started + t - time.time()))
                await update_pins(nc.jetstream(), services_of(allocation), None)

        async def watch() -> None:
            while True:
                status = await read_status(nc.jetstream())
                if status is not None:
                    timeline.append({"t": round(time.time() - started, 1),
                                     **{f"{v.service}": f"{v.running}/{v.desired}" for v in status.stages}})
                await asyncio.sleep(2.0)

        pinning, watching = asyncio.create_task(pinner()), asyncio.create_task(watch())
        for entry in entries:
            await asyncio.sleep(max(0.0, started + entry.t - time.time()))
            await client.submit(entry.spec)
        deadline = time.time() + drain_s
        while any(math.isnan(r.done) for r in records.values()) and time.time() < deadline:
            await asyncio.sleep(0.5)
        pinning.cancel()
        watching.cancel()
    await nc.close()
    return list(records.values())


def run_live(policy: str, entries: list[TraceEntry], initial: Allocation, oracle: list[tuple[float, Allocation]],
             work: Path, drain_s: float, console: Console, timeline: list[dict]) -> list[JobRecord]:
    env = {"COMPOSE_PROFILES": "scheduler", "DF_MODELS": MODEL, "DF_SCHED_ACTUATOR": "local", "DF_SCHED_POOL": POOL,
           "DF_SCHED_POLICY": "hybrid" if policy == "oracle" else policy, **SCHEDULER_ENV}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    launcher = Launcher(work / f"stack-{policy}", models_dir=work / "models")
    try:
        started = time.perf_counter()
        launcher.up(services_of(initial))
        console.print(f"  live {policy}: stack up in {time.perf_counter() - started:.1f} s with {services_of(initial)}")
        pins = oracle if policy == "oracle" else []
        return asyncio.run(drive(launcher, entries, pins, drain_s, timeline))
    finally:
        launcher.down(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plot(timelines: dict[str, list[dict]], phase_s: float, path: Path) -> Path:
    """Instances running per service over time (the scheduler's view every 2 s), per policy."""
    import matplotlib  # the bench extra; `--quick` (which the tests run) draws nothing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(timelines), 1, figsize=(10, 1.8 * len(timelines)), sharex=True, squeeze=False)
    for ax, (policy, points) in zip(axes[:, 0], timelines.items()):
        for service in ("encoder", "dit", "decoder"):
            ax.step([p["t"] for p in points], [int(p[service].split("/")[0]) for p in points],
                    where="post", label=service)
        for k in (1, 2, 3):
            ax.axvline(k * phase_s, color="grey", linestyle=":", linewidth=1)
        ax.set_ylabel(policy)
    axes[0, 0].legend(loc="upper right", ncol=3, fontsize="small")
    axes[0, 0].set_title(f"EMULATED live: instances running per service, {POOL}; dotted: phase changes")
    axes[-1, 0].set_xlabel("seconds since the trace started")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def rows_of(policy: str, mode: str, records: list[JobRecord], truth: Predictor) -> list[dict]:
    by_phase: dict[str, list[JobRecord]] = {}
    for r in records:
        by_phase.setdefault(r.phase or "all", []).append(r)
    rows = []
    for phase, recs in by_phase.items():
        m = phase_metrics(phase, recs, truth)
        rows.append({"mode": mode, "policy": policy, "phase": phase, "jobs": m.jobs, "completed": m.completed,
                     "throughput": round(m.throughput, 4), "p95_s": round(m.p95_s, 2), "slo": round(m.slo, 4)})
    return rows


def mean_rows(runs: list[list[dict]]) -> list[dict]:
    """Per phase, the mean of several simulations' rows, and their throughputs' relative spread."""
    rows = []
    for phase_rows in zip(*runs):
        row = dict(phase_rows[0])
        for key, digits in (("throughput", 4), ("p95_s", 2), ("slo", 4)):
            row[key] = round(statistics.mean(r[key] for r in phase_rows), digits)
        throughputs = [r["throughput"] for r in phase_rows]
        spread = statistics.stdev(throughputs) / row["throughput"] if len(throughputs) > 1 and row["throughput"] else 0.0
        row["sim_runs"], row["throughput_rel_sd"] = len(phase_rows), round(spread, 3)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="15 s phases, hybrid only live (under 3 minutes)")
    parser.add_argument("--phase-s", type=float, default=None)
    parser.add_argument("--policies", default=None, help="policies to run live, comma-separated (default: all)")
    parser.add_argument("--load", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0, help="the trace's seed")
    parser.add_argument("--sim-seeds", type=int, default=5, help="simulations of the trace averaged per policy")
    args = parser.parse_args()
    console = Console(stderr=True)
    phase_s = args.phase_s or (15.0 if args.quick else 40.0)
    live_policies = (args.policies or ("hybrid" if args.quick else ",".join(POLICIES))).split(",")
    settings = SchedulerSettings(pool=POOL, **SETTINGS)
    pool, profiles = parse_pool(POOL), [ELASTIC_PROFILE]
    entries = trace(phase_s, args.load, args.seed, settings)
    truth = Predictor(profiles)
    # The stage workers' batching and fetching ahead as the live stack runs them (the bench
    # leaves DF_MAX_BATCH, DF_MAX_IN_FLIGHT and DF_FETCH_AHEAD_S at their defaults): the oracle
    # is searched, and every policy simulated, with the fleet the live run runs.
    workers = deployed_workers(Settings())
    oracle = oracle_schedule(entries, pool, profiles, settings, workers=workers)
    console.print(f"{len(entries)} jobs in 4 phases of {phase_s:.0f} s at load {args.load}; oracle: "
                  + "; ".join(str(services_of(a)) for _, a in oracle))
    static = oracle[0][1]
    rows, timelines, load_avg = [], {}, {}
    for name in POLICIES:
        # The simulation is random too (service-time noise, which pull JetStream serves): its
        # figure is the mean over --sim-seeds runs of the same trace, with their spread.
        runs = []
        for sim_seed in range(args.sim_seeds):
            policy = Scheduled("oracle", oracle) if name == "oracle" else make_policy(name, pool, settings, static=static)
            result, _, sim_truth = simulate(entries, pool, policy, profiles, settings, initial=static, seed=sim_seed,
                                            shared_startup=SHARED_STARTUP, workers=workers)
            runs.append(rows_of(name, "simulated", result.jobs, sim_truth))
        rows += mean_rows(runs)
    with tempfile.TemporaryDirectory(prefix="df-elastic-") as tmp:
        work = Path(tmp)
        write_model(work / "models" / MODEL, PIXART_SIGMA_GEOMETRY, ELASTIC_PROFILE)
        for name in live_policies:
            started = time.perf_counter()
            timelines[name] = []
            before = os.getloadavg()[0]
            records = run_live(name, entries, static, oracle, work, drain_s=30.0 if args.quick else 120.0,
                               console=console, timeline=timelines[name])
            rows += rows_of(name, "emulated-live", records, truth)
            load_avg[name] = {"before": round(before, 2), "after": round(os.getloadavg()[0], 2)}
            console.print(f"  live {name}: {sum(not math.isnan(r.done) for r in records)}/{len(records)} done, "
                          f"{time.perf_counter() - started:.0f} s wall")
    sim = {(r["policy"], r["phase"]): r for r in rows if r["mode"] == "simulated"}
    agreement = {}
    for r in rows:
        if r["mode"] == "emulated-live":
            s = sim[(r["policy"], r["phase"])]
            r["sim_throughput"] = s["throughput"]
            r["live_vs_sim"] = round(r["throughput"] / s["throughput"], 3) if s["throughput"] else None
            agreement.setdefault(r["policy"], []).append(r["live_vs_sim"])
    table = Table("mode", "policy", "phase", "jobs", "done", "jobs/s", "p95 (s)", "SLO met", "live/sim", title=f"elastic scheduling, {POOL}")
    for r in rows:
        table.add_row(r["mode"], r["policy"], r["phase"], str(r["jobs"]), str(r["completed"]), f"{r['throughput']:.3g}",
                      f"{r['p95_s']:.3g}", f"{r['slo']:.0%}", str(r.get("live_vs_sim", "")))
    console.print(table)
    worst = {p: max(abs(1 - x) for x in v if x is not None) for p, v in agreement.items()}
    if not args.quick:
        console.print(f"plot: {plot(timelines, phase_s, BENCH / 'elastic_live.png')}")
    console.print(f"command: PYTHONPATH=. python bench/elastic.py{' --quick' if args.quick else ''}"
                  f"{f' --phase-s {args.phase_s:g}' if args.phase_s else ''}{f' --policies {args.policies}' if args.policies else ''}")
    print(json.dumps({"bench": "elastic", "emulated_live": live_policies, "simulated": POLICIES, "pool": POOL,
                      "phase_s": phase_s, "load": args.load, "jobs": len(entries), "quick": args.quick,
                      "worst_live_vs_sim_throughput_error": worst,
                      "load_avg_1m": load_avg, "startup_s": SETTINGS["startup_s"], "rows": rows, "live_timelines": timelines}))


if __name__ == "__main__":
    main()
