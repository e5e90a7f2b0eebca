"""End to end: the disaggregated stack against the monolithic one, on the same cores, under an
open-loop mixed workload.

    PYTHONPATH=$PWD .venv/bin/python bench/e2e.py [--quick] [--model small] [--rates 0.5,0.8,1.0,1.3]
        [--jobs 48] [--runs 1] [--cores 2] [--dit 2] [--decoder 1] [--pipelines 2] [--plot bench/e2e.png]

Both stacks run the real services of compose.yaml through the embedded launcher (real
nats-server, real shm handoffs, one process per instance, real diffusers modules): the
disaggregated one as ``disagfusion up`` starts it (encoder, ``--dit`` dits, ``--decoder``
decoders), the monolithic one as ``disagfusion up --monolithic`` does (``--pipelines`` pipeline
processes, each running every stage). Every process uses one torch thread (DF_TORCH_THREADS=1)
so neither mode oversubscribes the cores with threads, and batches per stage (DF_MAX_BATCH=4:
prompts of a model at the encoder, jobs of one shape at dit, decoder and pipeline; a batch's
first job waits ``--batch-wait-ms`` for queued jobs to join it). Both stacks
run side by side; each arrival rate is measured on one, then the other, so that slow changes in
the machine's load (other users share it) fall on both.

Workload: jobs of mixed size, steps and prompt length, drawn with a fixed seed, arriving as a
Poisson process (seeded) at each rate, a multiple of the bound. Per mode and rate: throughput
(jobs ÷ first submission to last result), latency p50/p95/p99 (submission to result, as the
client sees it), and per stage the mean seconds a job waited (queue, handoff, waiting for its
batch) and computed (its batch's compute time), from the progress events and the results'
timings; and the CPU seconds the stack's processes used per job. The bound is ``--cores`` ÷ the mean job's compute seconds, measured in this process
before the stacks start (each stage loaded as the services load it, one thread, batch of one):
what the cores could do with no overhead and no batching gains. Prints tables, the machine and
its load, the command, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from nats.js.api import DeliverPolicy
from rich.console import Console
from rich.table import Table

from disagfusion.client import Client
from disagfusion.config import Settings
from disagfusion.launcher import Launcher
from disagfusion.machine import describe
from disagfusion.models import load_stage_model, model_directory
from disagfusion.protocol import STAGES, JobSpec, ProgressEvent, Result, unpack

MODES = ("disaggregated", "monolithic")
SIZES = [(128, 128), (256, 256)]
STEPS = [6, 12]
PROMPT_WORDS = "a lighthouse on a cliff at dusk with waves breaking on black rocks under a sky of slow red clouds".split()

console = Console(stderr=True)


def workload(model: str, count: int, seed: int) -> list[JobSpec]:
    """``count`` jobs of mixed size, steps and prompt length (1 to 18 words), reproducible."""
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        width, height = rng.choice(SIZES)
        words = rng.randint(1, len(PROMPT_WORDS))
        specs.append(JobSpec(model=model, prompt=" ".join(PROMPT_WORDS[:words]), seed=i, steps=rng.choice(STEPS),
                             width=width, height=height, guidance=4.5))
    return specs


def shapes(model: str) -> list[JobSpec]:
    """One job of every shape the workload draws, with the longest prompt."""
    return [JobSpec(model=model, prompt=" ".join(PROMPT_WORDS), steps=steps, width=w, height=h, guidance=4.5)
            for w, h in SIZES for steps in STEPS]


def calibrate(model: str, settings: Settings) -> dict[tuple, float]:
    """Seconds of compute per job shape (all stages, one thread, batch of one), the fastest of
    two runs after a warm-up: the work the bound divides the cores by."""
    torch.set_num_threads(1)
    models = {stage: load_stage_model(model, stage, settings) for stage in STAGES}
    seconds = {}
    for spec in shapes(model):
        runs = []
        for _ in range(3):
            started, tensors = time.perf_counter(), [{}]
            for stage in STAGES:
                tensors = models[stage].run([spec], tensors)
            runs.append(time.perf_counter() - started)
        seconds[spec.shape_key] = min(runs[1:])
    return seconds


def cpu_seconds(launcher: Launcher) -> float:
    """CPU seconds (user + system) the stack's service processes have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for procs in launcher.state().services.values():
        for proc in procs:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which ``count`` jobs arrive, a seeded Poisson process."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(count):
        t += rng.expovariate(rate)
        arrivals.append(t)
    return arrivals


async def open_loop(launcher: Launcher, specs: list[JobSpec], rate: float, seed: int, timeout: float) -> dict:
    """Submit ``specs`` at Poisson arrivals of ``rate`` jobs/s; wait for every result."""
    arrivals = poisson_arrivals(len(specs), rate, seed)
    submitted: dict[str, float] = {}
    received: dict[str, float] = {}
    results: dict[str, Result] = {}
    events: dict[str, list[ProgressEvent]] = {spec.job_id: [] for spec in specs}
    every = asyncio.Event()
    async with Client(launcher.client_settings()) as client:

        async def on_event(msg) -> None:
            event = unpack(ProgressEvent, msg.data)
            if event.job_id in events and event.kind != "step":
                events[event.job_id].append(event)

        event_sub = await client._bus.nc.subscribe("df.events.>", cb=on_event)
        result_sub = await client._js.subscribe("df.results.>", ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)

        async def collect() -> None:
            while len(results) < len(specs):
                msg = await result_sub.next_msg(timeout=timeout)
                result = unpack(Result, msg.data)
                if result.job_id in events and result.job_id not in results:
                    received[result.job_id] = time.time()
                    results[result.job_id] = result
            every.set()

        collector = asyncio.create_task(collect())
        start = time.monotonic()
        for spec, at in zip(specs, arrivals, strict=True):
            await asyncio.sleep(max(0.0, at - (time.monotonic() - start)))
            submitted[spec.job_id] = time.time()
            await client.submit(spec)
        await collector
        await asyncio.sleep(0.2)  # the last events
        await event_sub.unsubscribe()
        await result_sub.unsubscribe()
    return {"submitted": submitted, "received": received, "results": results, "events": events}


def summarise(specs: list[JobSpec], run: dict, bound: float) -> dict:
    submitted, received, results = run["submitted"], run["received"], run["results"]
    failed = [r.error for r in results.values() if r.status != "ok"]
    latencies = [received[s.job_id] - submitted[s.job_id] for s in specs]
    makespan = max(received.values()) - min(submitted.values())
    waited = {stage: [] for stage in STAGES}
    computed = {stage: [] for stage in STAGES}
    for spec in specs:
        result = results[spec.job_id]
        done = {e.stage: e.t for e in run["events"][spec.job_id] if e.kind == "stage_done"}
        before = submitted[spec.job_id]
        for stage in STAGES:
            # A job computes for its whole batch's time; the rest of its time at a stage it waits.
            batch_s = result.timings.get(stage, 0.0) * result.batch_sizes.get(stage, 1)
            ended = done.get(stage, received[spec.job_id] if stage == STAGES[-1] else before)
            computed[stage].append(batch_s)
            waited[stage].append(max(0.0, ended - before - batch_s))
            before = ended
    throughput = len(specs) / makespan
    return {
        "jobs": len(specs), "completed": sum(r.status == "ok" for r in results.values()), "failed": failed,
        "throughput": round(throughput, 3), "efficiency": round(throughput / bound, 3),
        "p50_s": round(percentile(latencies, 50), 3), "p95_s": round(percentile(latencies, 95), 3),
        "p99_s": round(percentile(latencies, 99), 3), "mean_s": round(statistics.mean(latencies), 3),
        "waited_s": {stage: round(statistics.mean(v), 3) for stage, v in waited.items()},
        "computed_s": {stage: round(statistics.mean(v), 3) for stage, v in computed.items()},
        "mean_batch": {stage: round(statistics.mean(results[s.job_id].batch_sizes.get(stage, 1) for s in specs), 2)
                       for stage in STAGES},
        "latencies_s": sorted(round(x, 3) for x in latencies),
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, colour in zip(MODES, ("tab:blue", "tab:orange"), strict=True):
        mine = [r for r in rows if r["mode"] == mode]
        rates = sorted({r["rate"] for r in mine})
        left.plot(rates, [statistics.mean(r["throughput"] for r in mine if r["rate"] == x) for x in rates],
                  "o-", color=colour, label=mode)
        for r in mine:
            if r["rate"] == max(rates):
                right.plot(r["latencies_s"], [(i + 1) / len(r["latencies_s"]) for i in range(len(r["latencies_s"]))],
                           color=colour, label=f"{mode} (run {r['run']})" if r["run"] == 0 else None)
    left.plot(sorted({r["rate"] for r in rows}), sorted({r["rate"] for r in rows}), ":", color="grey", label="offered")
    left.axhline(rows[0]["bound"], color="grey", ls="--", label="bound")
    left.set(xlabel="arrival rate (jobs/s)", ylabel="throughput (jobs/s)", title="throughput vs arrival rate")
    right.set(xlabel="latency (s)", ylabel="fraction of jobs", title=f"latency CDF at {max(r['rate'] for r in rows)} jobs/s")
    left.legend()
    right.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, two rates, few jobs (under 2 minutes)")
    parser.add_argument("--model", help="model served (default: small; tiny with --quick)")
    parser.add_argument("--rates", help="arrival rates as multiples of the bound, comma-separated")
    parser.add_argument("--jobs", type=int, help="jobs per mode, rate and run")
    parser.add_argument("--runs", type=int, default=1, help="repeat every (rate, mode) this many times")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores both stacks share (the bound's)")
    parser.add_argument("--dit", type=int, default=2, help="dit processes of the disaggregated stack")
    parser.add_argument("--decoder", type=int, default=1, help="decoder processes of the disaggregated stack")
    parser.add_argument("--pipelines", type=int, help="pipeline processes of the monolithic stack (default: --cores)")
    parser.add_argument("--max-batch", type=int, default=4, help="DF_MAX_BATCH of every stage")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="DF_MAX_BATCH_WAIT_MS: how long a batch's first job waits for queued jobs to join it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, help="write throughput vs rate and latency CDFs here (matplotlib)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON line (with latencies) here")
    args = parser.parse_args()
    model = args.model or ("tiny" if args.quick else "small")
    factors = [float(x) for x in (args.rates or ("0.6,1.3" if args.quick else "0.5,0.8,1.0,1.3")).split(",")]
    jobs = args.jobs or (10 if args.quick else 48)
    pipelines = args.pipelines or args.cores
    scales = {"disaggregated": {"encoder": 1, "dit": args.dit, "decoder": args.decoder},
              "monolithic": {"pipeline": pipelines}}
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    command = " ".join(["PYTHONPATH=$PWD", sys.executable, *sys.argv])

    with tempfile.TemporaryDirectory(prefix="df-bench-e2e-") as tmp, ExitStack() as stacks:
        models_dir = Path(tmp) / "models"
        settings = Settings(models_dir=models_dir)
        model_directory(model, settings)
        console.print(f"calibrating {model}: every workload shape through the three stages, one thread ...")
        per_shape = calibrate(model, settings)
        mix = workload(model, 400, args.seed)
        mean_job_s = statistics.mean(per_shape[spec.shape_key] for spec in mix)
        bound = args.cores / mean_job_s
        os.environ.update(DF_MODELS=model, DF_TORCH_THREADS="1", DF_MAX_BATCH=str(args.max_batch),
                          DF_MAX_BATCH_WAIT_MS=str(args.batch_wait_ms))
        launchers = {}
        for mode in MODES:
            console.print(f"starting the {mode} stack {scales[mode]} ...")
            launcher = Launcher(Path(tmp) / mode, models_dir=models_dir, monolithic=mode == "monolithic")
            launcher.up(scales[mode], timeout=300)
            stacks.callback(launcher.down)
            launchers[mode] = launcher
            asyncio.run(open_loop(launcher, shapes(model) + shapes(model), 50.0, 0, timeout=300))  # warm-up
        rows = []
        for run in range(args.runs):
            for factor in factors:
                rate = round(factor * bound, 3)
                specs_seed = args.seed + 1000 * run + round(100 * factor)
                # The first mode alternates, so neither always runs after the other.
                order = MODES if (run + factors.index(factor)) % 2 == 0 else MODES[::-1]
                for mode in order:
                    specs = workload(model, jobs, specs_seed)
                    console.print(f"run {run}: {mode} at {rate} jobs/s ({factor} x bound), {jobs} jobs ...")
                    cpu_before = cpu_seconds(launchers[mode])
                    measured = asyncio.run(open_loop(launchers[mode], specs, rate, specs_seed, timeout=300))
                    cpu_per_job = (cpu_seconds(launchers[mode]) - cpu_before) / jobs
                    rows.append({"mode": mode, "run": run, "rate": rate, "rate_x_bound": factor, "bound": round(bound, 3),
                                 **summarise(specs, measured, bound), "cpu_s_per_job": round(cpu_per_job, 3),
                                 "load_1m": round(os.getloadavg()[0], 2)})
    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    table = Table("mode", "run", "rate", "jobs/s", "eff.", "p50 s", "p95 s", "p99 s", "cpu s/job",
                  *(f"{s} wait/comp s" for s in STAGES), "batch e/d/v",
                  title=f"end to end, {model}: bound {bound:.2f} jobs/s ({args.cores} cores / {mean_job_s:.3f} s per mean job)")
    for r in rows:
        table.add_row(r["mode"], str(r["run"]), f"{r['rate']:.2f}", f"{r['throughput']:.2f}", f"{r['efficiency']:.2f}",
                      f"{r['p50_s']:.2f}", f"{r['p95_s']:.2f}", f"{r['p99_s']:.2f}", f"{r['cpu_s_per_job']:.2f}",
                      *(f"{r['waited_s'][s]:.2f} / {r['computed_s'][s]:.2f}" for s in STAGES),
                      "/".join(f"{r['mean_batch'][s]:.1f}" for s in STAGES))
    console.print(table)
    ratios = []
    for run in range(args.runs):
        for factor in factors:
            pair = {r["mode"]: r for r in rows if r["run"] == run and r["rate_x_bound"] == factor}
            ratios.append({"run": run, "rate_x_bound": factor,
                           "throughput_ratio": round(pair["disaggregated"]["throughput"] / pair["monolithic"]["throughput"], 3),
                           "p95_ratio": round(pair["disaggregated"]["p95_s"] / pair["monolithic"]["p95_s"], 3)})
    for ratio in ratios:
        console.print(f"run {ratio['run']} at {ratio['rate_x_bound']} x bound: disaggregated/monolithic throughput "
                      f"{ratio['throughput_ratio']:.3f}, p95 {ratio['p95_ratio']:.3f}")
    console.print(f"load before: {load_before}")
    console.print(f"load after:  {load_after}")
    console.print(f"reproduce: {command}")
    report = {
        "bench": "e2e", "model": model, "command": command, "machine": describe(), "uptime_before": load_before,
        "uptime_after": load_after, "cores": args.cores, "scales": scales, "max_batch": args.max_batch,
        "max_batch_wait_ms": args.batch_wait_ms,
        "torch_threads": 1, "bound": round(bound, 3), "mean_job_s": round(mean_job_s, 4),
        "workload": {"sizes": SIZES, "steps": STEPS, "prompt_words": [1, len(PROMPT_WORDS)], "guidance": 4.5,
                     "jobs": jobs, "seed": args.seed},
        "rows": rows, "ratios": ratios,
    }
    if args.plot:
        plot(rows, args.plot, f"{model}, {args.cores} cores, {command.split(' ', 1)[1]}")
        console.print(f"plot: {args.plot}")
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    for row in report["rows"]:
        row.pop("latencies_s")  # the JSON line stays one readable line; --json-out keeps them
    print(json.dumps(report))


if __name__ == "__main__":
    main()
