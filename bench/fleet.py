"""EMULATED fleet comparison: the disaggregated fleet against one monolithic pipeline per device,
on device classes with memory, in the scheduler's simulation (simulated time).

Nothing here ran on a GPU. The device classes are emulated (``gpu24``: 24 GB, ``gpu80``: 80 GB),
each model's weights per stage come from published parameter counts (bf16, 2 bytes each), its
stage times from published figures where there are any and from stated assumptions where there
are none (``SOURCES`` and each model's ``source`` say which). The disaggregated fleet places each
stage only where it fits (``Pool.fitted``) and the hybrid scheduler rebalances it; the monolithic
baseline (services/scheduler/monolithic.py) runs whole jobs per device and offloads what does not
fit, at the cost LightX2V published. Both see the same trace on the same pool, at two loads:
``half`` (half the monolithic fleet's capacity: latency when neither is overloaded) and
``saturated`` (1.3x the larger of the two capacities: throughput).

This is what ``disagfusion plan --baseline monolithic`` computes; ``--export DIR`` writes each
scenario's profile and trace so the command reproduces a row.

``--live`` also runs LIVE_SCENARIOS on the emulated accelerator (bench/fleet_live.py: real
services, one process per slot, 12 slots per mode, emulated stage times); ``--quick`` runs a
short live run of the first. Their rows carry ``source`` "emulated-live" (the simulation's
"emulated-simulated") and ``live_sim_ratio`` against the simulation of the very trace submitted live
(``simulated_same_trace``: the same jobs at the same seeded Poisson arrivals).

Reproduce: PYTHONPATH=. python bench/fleet.py [--quick] [--live] [--export DIR]
Ends with one JSON line: {"bench": "fleet-emulated", "rows": [{"scenario", "mode", "source", "load",
"rate", "throughput", "p50_s", "p95_s", ...}], "ratios": [...]}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from disagfusion.config import SHIPPED_PROFILES_DIR, Settings, WorkerSettings
from disagfusion.cost import CostProfile
from disagfusion.memory import GB, fleet_memory
from disagfusion.protocol import STAGES, JobSpec
from services.scheduler.config import SchedulerSettings
from services.scheduler.monolithic import Offload, monolithic_devices
from services.scheduler.planner import plan
from services.scheduler.pool import Pool, parse_pool
from services.scheduler.predictor import Predictor
from services.scheduler.simulation import deployed_workers
from services.scheduler.trace import TraceEntry, write_trace

from e2e import poisson_arrivals  # noqa: E402  (bench/ is the script's directory)
from fleet_live import LIVE_SEED, LiveRun, run_live, stage_seconds  # noqa: E402

BENCH = Path(__file__).resolve().parent

PAPER = {"throughput": (3.4, 20.5), "latency": 18.5}
"""The DisagFusion paper's reported gains over a monolithic baseline (throughput range, times
lower latency), as the project's issue 22 quotes them."""

SOURCES = {
    "lightx2v-disagg": "https://light-ai.top/LightX2V-BLOG/posts/Disaggregation/ (LightX2V x Mooncake, "
                       "'Breaking the Memory and Throughput Bottlenecks of Diffusion Model Inference'): table of "
                       "parameters and BF16 weights (Wan2.1 DiT-14B 14.0B/28.0 GB, T5-XXL ~4.7B/9.4 GB, Wan VAE "
                       "~0.10B/0.2 GB); '32.2x Text Encoder speedup on RTX 4090 (offload eliminated)' "
                       "(12.89 s with offload vs 0.40 s, as issue 22 quotes it: 12.89/0.40 = 32.2); "
                       "'Up to 1.54x DiT per-step speedup'",
    "sglang-wan-1.3b": "SGLang's Wan2.1-T2V-1.3B stage times on one H200 (text encoder 2.3 s, DiT 312.8 s, VAE "
                       "7.1 s; 832x480, 81 frames, 50 steps, CFG), as deploy/profiles/wan2_1-t2v-1_3b-h200.yaml cites",
    "lightx2v-h200-14b": "LightX2V benchmark (docs/EN/source/getting_started/benchmark_source.md, via "
                         "https://deepwiki.com/ModelTC/lightx2v/6.6-performance-benchmarks): Wan2.1 official code, "
                         "I2V-14B-480P, 40 steps, CFG, H200: 366 s end to end, 71 GB peak",
    "wan-card": "Wan2.1 model cards (Wan-AI/Wan2.1-T2V-14B, -1.3B): 14B and 1.3B parameters",
    "flux-card": "black-forest-labs/FLUX.1-dev model card: 'a 12 billion parameter rectified flow transformer'",
    "sd35-card": "stabilityai/stable-diffusion-3.5-large model card: MMDiT of 8.1B parameters; -large-turbo: the "
                 "same model distilled (ADD) to 4 steps without guidance",
    "assumption": "no published figure found: an estimate, stated where it is used",
}

# Relative speeds of the emulated classes (H200 = 1): ASSUMPTIONS, as pool.py's KNOWN_CLASSES
# (an 80 GB H100 0.85; a 24 GB RTX 4090 / L4-class card 0.4, l40s's figure).
POOLS = {
    "12x24gb": "gpu24:12::0.4:24",
    "4x80gb+8x24gb": "gpu80:4::0.85:80,gpu24:8::0.4:24",
}

WORKERS = {  # as bench/elastic_sim.py's accelerator fleet: no fetching ahead, batches of a shape
    "encode": WorkerSettings(max_batch=16, fetch_ahead_s=0),
    "denoise": WorkerSettings(max_batch=8, max_batch_mpx=4.0, fetch_ahead_s=0),
    "decode": WorkerSettings(max_batch=8, max_batch_mpx=4.0, fetch_ahead_s=0),
}

T5_XXL = 9_400_000_000  # lightx2v-disagg
CLIP_L = 246_000_000  # ASSUMPTION: CLIP ViT-L/14 text model ~123M parameters
CLIP_G = 1_390_000_000  # ASSUMPTION: OpenCLIP bigG text model ~695M parameters
IMAGE_VAE = 168_000_000  # ASSUMPTION: the 16-channel image VAE of FLUX/SD3 ~84M parameters

# Working memory beyond weights: ASSUMPTIONS (no per-stage activation figure was found). Wan's
# VAE decoding 81 frames at 480p untiled holds several GB of frames and features; an image VAE at
# 1024x1024 a few; the DiTs get the planner's 20 % allowance. The totals agree with LightX2V's
# 71 GB peak for the official Wan2.1-14B pipeline (lightx2v-h200-14b) only roughly (53 GB here).
VIDEO_VAE_WORKING = 8_000_000_000
IMAGE_VAE_WORKING = 4_000_000_000

PROMPT = "a lighthouse on a cliff at dusk, waves breaking below, cinematic, detailed " * 2
WAN_VIDEO = dict(height=480, width=832, frames=81, guidance=5.0)
WAN_MPX = 0.39936 * 81  # megapixel-frames of one 832x480x81 video


def h200_seconds_per_step(params: float, tokens: int, mfu: float = 0.4, peak_tflops: float = 989.0) -> float:
    """ASSUMPTION for image DiTs without a published stage time: one forward pass is 2 FLOPs per
    parameter per token, at ``mfu`` of the H200's dense bf16 peak."""
    return 2.0 * params * tokens / (mfu * peak_tflops * 1e12)


@dataclass(frozen=True)
class Model:
    name: str
    profile: CostProfile
    job: dict
    """JobSpec fields of the scenario's jobs."""


def profile(name: str, source: str, encode_s: float, denoise: dict, decode: dict, weights: dict[str, int],
            working: dict[str, int]) -> CostProfile:
    return CostProfile.model_validate({
        "model": name, "hardware": "emulated, NVIDIA H200 reference", "kind": "published", "source": source,
        "stages": {"encode": {"per_job_s": encode_s, "cfg_factor": 2.0}, "denoise": denoise, "decode": decode},
        "weight_bytes": weights, "activation_bytes": working,
    })


def models() -> dict[str, Model]:
    wan13 = CostProfile.load(SHIPPED_PROFILES_DIR / "wan2_1-t2v-1_3b-h200.yaml")
    # Wan2.1-14B: the 366 s end to end (lightx2v-h200-14b) less the umt5 encoder and Wan VAE, which
    # the 14B shares with the 1.3B (sglang-wan-1.3b: 2.3 s, 7.1 s), is its DiT: 356.6 s for 40 steps
    # with CFG at 832x480x81 (an I2V run standing in for T2V: same DiT, plus a CLIP image encoder).
    wan14_denoise = (366.0 - 2.3 - 7.1) / (40 * 2 * WAN_MPX)
    flux_step = h200_seconds_per_step(12e9, 4096 + 512)
    sd35_step = h200_seconds_per_step(8.1e9, 4096 + 333)
    # ASSUMPTION: a T5-XXL prompt resident takes LightX2V's 0.40 s on its RTX 4090, i.e. 0.16 s on
    # the H200 reference at the 24 GB class's 0.4; an image VAE decode of 1024x1024 0.3 s.
    t5_h200 = 0.40 * 0.4
    image = dict(height=1024, width=1024, frames=1)
    return {
        "wan2_1-t2v-14b": Model("wan2_1-t2v-14b", profile(
            "wan2_1-t2v-14b", "lightx2v-h200-14b DiT, sglang-wan-1.3b encoder and VAE; weights lightx2v-disagg",
            wan13.stages["encode"].per_job_s,
            {"per_mpixel_s": wan14_denoise, "per_step": True, "cfg_factor": 2.0},
            {"per_mpixel_s": wan13.stages["decode"].per_mpixel_s},
            {"encode": T5_XXL, "denoise": 28_000_000_000, "decode": 200_000_000},
            {"decode": VIDEO_VAE_WORKING}), dict(WAN_VIDEO, steps=40)),
        "wan2_1-t2v-1_3b": Model("wan2_1-t2v-1_3b", wan13.model_copy(update={
            "model": "wan2_1-t2v-1_3b", "activation_bytes": {"decode": VIDEO_VAE_WORKING}}), dict(WAN_VIDEO, steps=50)),
        "flux1-dev": Model("flux1-dev", profile(
            "flux1-dev", "weights flux-card + lightx2v-disagg (T5-XXL); times ASSUMED (FLOPs estimate)",
            t5_h200, {"per_job_s": flux_step, "per_step": True}, {"per_job_s": 0.3},
            {"encode": T5_XXL + CLIP_L, "denoise": 24_000_000_000, "decode": IMAGE_VAE},
            {"decode": IMAGE_VAE_WORKING}), dict(image, steps=28, guidance=1.0)),
        "sd3_5-large": Model("sd3_5-large", profile(
            "sd3_5-large", "weights sd35-card + lightx2v-disagg (T5-XXL); times ASSUMED (FLOPs estimate)",
            t5_h200, {"per_job_s": sd35_step, "per_step": True, "cfg_factor": 2.0}, {"per_job_s": 0.3},
            {"encode": T5_XXL + CLIP_L + CLIP_G, "denoise": 16_200_000_000, "decode": IMAGE_VAE},
            {"decode": IMAGE_VAE_WORKING}), dict(image, steps=28, guidance=3.5)),
        "sd3_5-large-turbo": Model("sd3_5-large-turbo", profile(
            "sd3_5-large-turbo", "as sd3.5-large, 4 steps without guidance (sd35-card); times ASSUMED",
            t5_h200, {"per_job_s": sd35_step, "per_step": True, "cfg_factor": 2.0}, {"per_job_s": 0.3},
            {"encode": T5_XXL + CLIP_L + CLIP_G, "denoise": 16_200_000_000, "decode": IMAGE_VAE},
            {"decode": IMAGE_VAE_WORKING}), dict(image, steps=4, guidance=1.0)),
    }


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str
    pool: str
    offload: Offload

    @property
    def label(self) -> str:
        return f"emulated-{self.name}"


SCENARIOS = [
    Scenario("wan1.3b-12x24gb", "wan2_1-t2v-1_3b", "12x24gb", Offload()),
    Scenario("wan14b-mixed", "wan2_1-t2v-14b", "4x80gb+8x24gb", Offload()),
    Scenario("wan14b-mixed-streamed-offload", "wan2_1-t2v-14b", "4x80gb+8x24gb", Offload(dit_streamed=True)),
    Scenario("flux-dev-mixed", "flux1-dev", "4x80gb+8x24gb", Offload()),
    Scenario("sd3.5-large-12x24gb", "sd3_5-large", "12x24gb", Offload()),
    Scenario("sd3.5-large-turbo-12x24gb", "sd3_5-large-turbo", "12x24gb", Offload()),
]

LIVE_SCENARIOS = ["sd3.5-large-turbo-12x24gb", "wan1.3b-12x24gb"]
"""Run live with --live: one where the monolithic fleet offloads, one where nothing is offloaded."""
LIVE_SLOTS = 12


def capacities(model: Model, pool: Pool, offload: Offload) -> tuple[float, float]:
    """Jobs per second each fleet can sustain, estimated: the monolithic one exactly (devices
    in parallel, one job each); the disaggregated one by its bound (every stage's work over the
    speed of the devices that may host it, and all work over all devices)."""
    settings = Settings(models_dir=Path("/nonexistent"))
    needs = fleet_memory([model.name], [model.profile], settings)
    truth = Predictor([model.profile])
    spec = JobSpec(job_id="probe", model=model.name, prompt=PROMPT, **model.job)
    costs = dict(zip(STAGES, truth.job_costs(spec)))
    mono = sum(1.0 / d.seconds(spec, truth, needs, offload) for d in monolithic_devices(pool, needs))
    fitted = pool.fitted(needs)
    per_stage = [sum(c.count * c.speed_for(s) for c in fitted.classes) / costs[s] for s in STAGES]
    overall = sum(c.count * c.speed for c in fitted.classes if c.stages) / sum(costs.values())
    return mono, min(min(per_stage), overall)


def trace_of(model: Model, rate: float, jobs: int) -> list[TraceEntry]:
    return [TraceEntry(t=k / rate, spec=JobSpec(job_id=f"{model.name}-{k}", model=model.name, prompt=PROMPT, **model.job))
            for k in range(jobs)]


def simulate(scenario: Scenario, model: Model, trace: list[TraceEntry]):
    """The hybrid plan of ``trace`` with the monolithic baseline beside it (a ``PlanReport``)."""
    settings = Settings(models_dir=Path("/nonexistent"))  # plan from the profiles, no checkpoint
    needs = fleet_memory([model.name], [model.profile], settings)
    report = plan(trace, parse_pool(POOLS[scenario.pool]), [model.profile], SchedulerSettings(),
                  pool_text=POOLS[scenario.pool], memory=needs, baseline="monolithic", offload=scenario.offload,
                  workers=deployed_workers(WORKERS))
    assert report.baseline is not None
    return report


def run(scenario: Scenario, model: Model, jobs: int, min_span_s: float, console: Console,
        export: Path | None) -> tuple[list[dict], dict]:
    pool = parse_pool(POOLS[scenario.pool])
    mono_cap, disagg_cap = capacities(model, pool, scenario.offload)
    settings = Settings(models_dir=Path("/nonexistent"))  # plan from the profiles, no checkpoint
    needs = fleet_memory([model.name], [model.profile], settings)
    rows, ratio = [], {"scenario": scenario.label, "model": model.name, "pool": POOLS[scenario.pool]}
    for load, rate in (("half", 0.5 * mono_cap), ("saturated", 1.3 * max(mono_cap, disagg_cap))):
        # Arrivals last at least min_span_s, so instances' start-up (tens of seconds) does not
        # decide the result for short image jobs.
        trace = trace_of(model, rate, max(jobs, math.ceil(rate * min_span_s)))
        started = time.perf_counter()
        report = simulate(scenario, model, trace)
        base = report.baseline
        placed = {d.stage: d.peak for d in report.deployment}
        common = {"scenario": scenario.label, "source": "emulated-simulated", "model": model.name,
                  "pool": POOLS[scenario.pool], "load": load,
                  "rate": round(rate, 6), "jobs": len(trace)}
        rows.append({**common, "mode": "disaggregated", "throughput": round(report.overall.throughput, 6),
                     "p50_s": round(report.overall.p50_s, 2), "p95_s": round(report.overall.p95_s, 2),
                     "completed": report.overall.completed, "placement": placed,
                     "capacity_estimate": round(disagg_cap, 6)})
        rows.append({**common, "mode": "monolithic", "throughput": round(base.overall.throughput, 6),
                     "p50_s": round(base.overall.p50_s, 2), "p95_s": round(base.overall.p95_s, 2),
                     "completed": base.overall.completed, "offloaded": base.offloaded,
                     "capacity_estimate": round(mono_cap, 6)})
        ratio[f"{load}_throughput_ratio"] = round(base.throughput_ratio, 3)
        ratio[f"{load}_p95_ratio"] = round(base.p95_ratio, 3)
        console.print(f"  {scenario.label} {load}: {len(trace)} jobs at {rate:.4g}/s simulated in "
                      f"{time.perf_counter() - started:.1f} s wall")
        if export is not None:
            write_trace(export / f"{scenario.label}-{load}.jsonl", trace)
    if export is not None:
        model.profile.save(export / "profiles" / f"{model.name}.yaml")
    ratio["needs_gb"] = {s: round(n.total_bytes / GB, 1) for s, n in needs.items()}
    ratio["capacity"] = {"monolithic": mono_cap, "disaggregated": disagg_cap}
    return rows, ratio


def live(scenario: Scenario, model: Model, sim_rows: list[dict], ratio: dict, jobs: int, span_s: float,
         loads: list[str], console: Console) -> list[dict]:
    """``scenario`` live on LIVE_SLOTS emulated slots per mode, at the simulated rows' rates; time
    compressed so the monolithic run's ``jobs`` take about ``span_s`` at its capacity."""
    pool = parse_pool(POOLS[scenario.pool])
    seconds = stage_seconds(model.profile, model.job, PROMPT, pool, scenario.offload)
    speed = round(max(1.0, jobs / (span_s * ratio["capacity"]["monolithic"])), 2)
    offloaded = next(r for r in sim_rows if r["mode"] == "monolithic")["offloaded"]
    rows = []
    for load in loads:
        rate = next(r["rate"] for r in sim_rows if r["load"] == load)
        live_rows = run_live(LiveRun(scenario.label, LIVE_SLOTS, speed, jobs, rate, load), seconds,
                             sorted({s for stages in offloaded.values() for s in stages}), console)
        # The simulation of the very trace the live run submitted (its seeded Poisson arrivals, in
        # simulated seconds, the scenario's job): at saturation p95 grows with the trace's length,
        # so only the same trace compares.
        arrivals = poisson_arrivals(jobs, rate * speed, LIVE_SEED)
        same = simulate(scenario, model, [TraceEntry(t=t * speed, spec=JobSpec(job_id=f"{model.name}-{k}", model=model.name,
                                                                                prompt=PROMPT, **model.job))
                                          for k, t in enumerate(arrivals)])
        for row in live_rows:
            sim = same.overall if row["mode"] == "disaggregated" else same.baseline.overall
            row["simulated_same_trace"] = {"throughput": round(sim.throughput, 6), "p95_s": round(sim.p95_s, 2)}
            if row["mode"] == "disaggregated":  # the simulated fleet scales up from fewer, paying start-ups
                row["simulated_same_trace"]["mean_instances"] = {d.stage: round(d.mean, 2) for d in same.deployment}
            row["live_sim_ratio"] = {"throughput": round(row["throughput"] / sim.throughput, 3),
                                     "p95": round(row["p95_s"] / sim.p95_s, 3)}
        d, m = (next(r for r in live_rows if r["mode"] == mode) for mode in ("disaggregated", "monolithic"))
        ratio[f"live_{load}_throughput_ratio"] = round(d["throughput"] / m["throughput"], 3)
        ratio[f"live_{load}_p95_ratio"] = round(m["p95_s"] / d["p95_s"], 3)
        ratio[f"same_trace_{load}_throughput_ratio"] = round(same.baseline.throughput_ratio, 3)
        ratio[f"same_trace_{load}_p95_ratio"] = round(same.baseline.p95_ratio, 3)
        rows += live_rows
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer jobs per run (a smoke run)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="jobs per trace at least (default 240, quick 36); arrivals span at least 900 s (quick 120 s)")
    parser.add_argument("--live", action="store_true",
                        help="also run LIVE_SCENARIOS on the emulated accelerator, 12 slots per mode (a few minutes)")
    parser.add_argument("--live-jobs", type=int, default=None, help="jobs per live run (default 60, quick 16)")
    parser.add_argument("--live-loads", default="saturated", help="loads run live, comma-separated: saturated,half")
    parser.add_argument("--export", type=Path, default=None,
                        help="write each scenario's profile and traces here, for disagfusion plan --baseline monolithic")
    args = parser.parse_args()
    console = Console(stderr=True, width=170)
    jobs = args.jobs or (36 if args.quick else 240)
    known = models()
    if args.export is not None:
        args.export.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, ratios = [], []
    for scenario in SCENARIOS:
        scenario_rows, ratio = run(scenario, known[scenario.model], jobs, 120.0 if args.quick else 900.0, console, args.export)
        rows += scenario_rows
        ratios.append(ratio)
    live_names = LIVE_SCENARIOS if args.live else LIVE_SCENARIOS[:1] if args.quick else []
    live_jobs = args.live_jobs or (16 if args.quick and not args.live else 60)
    for scenario in (s for s in SCENARIOS if s.name in live_names):
        ratio = next(r for r in ratios if r["scenario"] == scenario.label)
        sim_rows = [r for r in rows if r["scenario"] == scenario.label]
        rows += live(scenario, known[scenario.model], sim_rows, ratio, live_jobs, 15.0 if args.quick and not args.live
                     else 60.0, args.live_loads.split(","), console)
    table = Table("scenario (EMULATED, simulated)", "pool", "load", "disagg jobs/s", "mono jobs/s", "throughput x",
                  "disagg p95 s", "mono p95 s", "p95 x lower", title="Disaggregated vs monolithic, emulated fleet")
    for r in ratios:
        for load in ("half", "saturated"):
            d, m = (next(x for x in rows if x["scenario"] == r["scenario"] and x["load"] == load and x["mode"] == mode)
                    for mode in ("disaggregated", "monolithic"))
            table.add_row(r["scenario"], r["pool"], load, f"{d['throughput']:.4g}", f"{m['throughput']:.4g}",
                          f"{r[f'{load}_throughput_ratio']:.2f}", f"{d['p95_s']:.4g}", f"{m['p95_s']:.4g}",
                          f"{r[f'{load}_p95_ratio']:.2f}")
    console.print(table)
    live_rows = [r for r in rows if r["source"] == "emulated-live"]
    if live_rows:
        table = Table("scenario (EMULATED, live)", "load", "mode", "processes", "speed", "jobs ok", "live jobs/s",
                      "sim jobs/s", "live/sim", "live p95 s", "sim p95 s", "live/sim",
                      caption="sim: the simulation of the same trace (same jobs, same Poisson arrivals)",
                      title="Live on the emulated accelerator (figures in simulated-time units: live x speed)")
        for r in live_rows:
            table.add_row(r["scenario"], r["load"], r["mode"], str(r["scales"]), f"{r['speed']:g}",
                          f"{r['completed']}/{r['jobs']}", f"{r['throughput']:.4g}",
                          f"{r['simulated_same_trace']['throughput']:.4g}", f"{r['live_sim_ratio']['throughput']:.2f}",
                          f"{r['p95_s']:.4g}", f"{r['simulated_same_trace']['p95_s']:.4g}", f"{r['live_sim_ratio']['p95']:.2f}")
        console.print(table)
        for r in ratios:
            for load in ("saturated", "half"):
                if f"live_{load}_throughput_ratio" in r:
                    console.print(f"{r['scenario']} {load}, emulated live: disaggregated/monolithic throughput "
                                  f"{r[f'live_{load}_throughput_ratio']:.2f}x (simulated, same trace "
                                  f"{r[f'same_trace_{load}_throughput_ratio']:.2f}x; long trace {r[f'{load}_throughput_ratio']:.2f}x), "
                                  f"p95 {r[f'live_{load}_p95_ratio']:.2f}x lower (simulated, same trace "
                                  f"{r[f'same_trace_{load}_p95_ratio']:.2f}x; long trace {r[f'{load}_p95_ratio']:.2f}x)")
        console.print("Live: the monolithic pipelines' emulated model includes the offload seconds the monolithic plan "
                      "computes (data only, no service change); stage times are emulated sleeps, tensors small.")
    load = os.getloadavg()
    command = " ".join(["PYTHONPATH=. python bench/fleet.py", *sys.argv[1:]])
    machine = subprocess.run(["uname", "-srm"], capture_output=True, text=True).stdout.strip()
    console.print(f"EMULATED device classes, SIMULATED time: nothing ran on a GPU. Paper: {PAPER['throughput'][0]}-"
                  f"{PAPER['throughput'][1]}x throughput, {PAPER['latency']}x lower latency. Sources: the script's SOURCES.")
    console.print(f"reproduce: {command}  (machine {machine}, load average {load[0]:.2f}, "
                  f"{time.perf_counter() - started:.1f} s wall)", soft_wrap=True)
    print(json.dumps({
        "bench": "fleet-emulated", "simulated": True, "live": bool(live_rows), "quick": args.quick, "jobs_per_run": jobs,
        "wall_s": round(time.perf_counter() - started, 1), "paper": PAPER, "sources": SOURCES,
        "command": command, "machine": machine, "loadavg": [round(x, 2) for x in load],
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), "rows": rows, "ratios": ratios,
    }))


if __name__ == "__main__":
    sys.exit(main())
