"""SIMULATED comparison of scaling policies under the four-phase workload shift.

Runs the scheduler's discrete-event simulation (simulated time; services/scheduler/simulation.py)
with the same controller and policy code the live scheduler runs, at 12 slots (the size of the
emulated live fleet) and at 1,024 slots (h100:384,l4:640), for: static (best allocation for
phase 1), lag (KEDA's JetStream rule), threshold (the DisagFusion authors' rule), predictor
(cost prediction only), hybrid (prediction plus feedback), and oracle (best static allocation per
phase, found by search and switched to when each phase begins). Service times come from the cost
profiles in deploy/profiles/ (the image one is a PLACEHOLDER; the video one is SGLang's published
Wan2.1 figures), with 5% log-normal noise. Nothing here ran on a GPU or on the real services.

Reproduce: PYTHONPATH=. python bench/elastic_sim.py [--quick]
Writes bench/elastic_sim_<scenario>.png (instances per stage over time, per policy) and ends
with one JSON line: {"rows": [{"scenario", "policy", "phase", "throughput", "p95_s", "slo", ...}]}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from traces import four_phase_trace  # noqa: E402

from disagfusion.config import ModelSettings, WorkerSettings  # noqa: E402
from disagfusion.cost import load_profiles  # noqa: E402
from disagfusion.protocol import STAGES  # noqa: E402
from services.scheduler.config import SchedulerSettings  # noqa: E402
from services.scheduler.planner import oracle_schedule, phases_of, report, simulate  # noqa: E402
from services.scheduler.policies import Scheduled, make_policy  # noqa: E402
from services.scheduler.pool import parse_pool, per_stage  # noqa: E402
from services.scheduler.simulation import deployed_workers  # noqa: E402

BENCH = Path(__file__).resolve().parent
POLICIES = ["static", "lag", "threshold", "predictor", "hybrid", "oracle"]


# The stage workers of an accelerator fleet, as its deployment would set them per service:
# large batches (a text encoder batches 16 prompts; a DiT or VAE 8 jobs of a shape, at most 4
# megapixel-frames, so a video runs alone) and no fetching ahead (DF_FETCH_AHEAD_S=0: a busy
# instance leaves the queue to idle ones).
FLEET_WORKERS = {
    "encode": WorkerSettings(max_batch=16, fetch_ahead_s=0),
    "denoise": WorkerSettings(max_batch=8, max_batch_mpx=4.0, fetch_ahead_s=0),
    "decode": WorkerSettings(max_batch=8, max_batch_mpx=4.0, fetch_ahead_s=0),
}

PROFILE_ERROR = {"encode": 0.5, "denoise": 1.5, "decode": 2.0}
"""What the predicting policies' starting profile is off by, per stage (predicted / true): as if
measured on another machine. The true profile generates the service times and the trace."""


def run_scenario(name: str, pool_text: str, phase_s: float, load: float, seed: int, profile_error: dict[str, float],
                 console: Console) -> tuple[list[dict], dict]:
    pool = parse_pool(pool_text)
    profiles = list(load_profiles([ModelSettings().profiles_dir]).values())
    start = [p.scaled(profile_error) for p in profiles]
    settings = SchedulerSettings()
    workers = deployed_workers(FLEET_WORKERS)
    trace = four_phase_trace(pool, phase_s, load, seed)
    started = time.perf_counter()
    oracle = oracle_schedule(trace, pool, profiles, settings, workers=workers)
    search_s = time.perf_counter() - started
    console.print(f"[bold]{name}[/]: pool {pool_text}, {len(trace)} jobs, phases of {phase_s:.0f} s at load {load}; "
                  f"oracle search {search_s:.1f} s: " + "; ".join(str(per_stage(a)) for _, a in oracle))
    static = oracle[0][1]
    rows, timelines = [], {}
    for policy_name in POLICIES:
        policy = Scheduled("oracle", oracle) if policy_name == "oracle" else make_policy(policy_name, pool, settings, static=static)
        started = time.perf_counter()
        # Every policy's scheduler starts from the same wrong profile (only predictor and hybrid
        # use it) and refines it from timing samples; the oracle was found with the true one.
        result, predictor, truth = simulate(trace, pool, policy, start, settings, initial=static, seed=seed,
                                            truth_profiles=profiles, workers=workers)
        plan = report(policy_name, pool_text, result, truth, predictor)
        timelines[policy_name] = result.timeline
        for phase in plan.phases:
            rows.append({
                "scenario": name, "seed": seed, "slots": pool.total, "policy": policy_name, "phase": phase.phase,
                "throughput": round(phase.throughput, 5), "p95_s": round(phase.p95_s, 2), "slo": round(phase.slo, 4),
                "jobs": phase.jobs, "instance_starts": result.instance_starts,
            })
        console.print(f"  {policy_name}: simulated {result.end:.0f} s in {time.perf_counter() - started:.1f} s wall")
    oracle_tp = {r["phase"]: r["throughput"] for r in rows if r["policy"] == "oracle"}
    for r in rows:
        r["throughput_vs_oracle"] = round(r["throughput"] / oracle_tp[r["phase"]], 4) if oracle_tp[r["phase"]] else None
    if seed == 0:
        plot(name, pool_text, timelines, [t for _, t, _ in phases_of(trace)])
    return rows, {"pool": pool_text, "jobs": len(trace), "phase_s": phase_s, "load": load, "oracle_search_s": round(search_s, 1)}


def plot(name: str, pool_text: str, timelines: dict, phase_starts: list[float]) -> Path:
    fig, axes = plt.subplots(len(timelines), 1, figsize=(10, 2.0 * len(timelines)), sharex=True)
    for ax, (policy, points) in zip(axes, timelines.items()):
        for stage in STAGES:
            ax.step([p.t for p in points], [p.running[stage] for p in points], where="post", label=stage)
        for start in phase_starts[1:]:
            ax.axvline(start, color="grey", linestyle=":", linewidth=1)
        ax.set_ylabel(policy)
    axes[0].legend(loc="upper right", ncol=3, fontsize="small")
    axes[0].set_title(f"SIMULATED instances serving per stage, {name} ({pool_text}); dotted: phase changes")
    axes[-1].set_xlabel("simulated seconds")
    fig.tight_layout()
    path = BENCH / f"elastic_sim_{name}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter phases (a smoke run)")
    parser.add_argument("--load", type=float, default=0.8, help="arrival rate as a fraction of each phase's capacity")
    parser.add_argument("--seeds", default="0", help="trace and noise seeds, comma-separated")
    parser.add_argument("--scenarios", default="12-slots,1024-slots")
    parser.add_argument("--profile-error", default=json.dumps(PROFILE_ERROR),
                        help="JSON: per stage, the factor the predictors' starting profile is off by")
    args = parser.parse_args()
    console = Console(stderr=True)
    profile_error = json.loads(args.profile_error)
    scenarios = [
        ("12-slots", "slot:12", 240.0 if args.quick else 600.0),
        ("1024-slots", "h100:384,l4:640", 60.0 if args.quick else 180.0),
    ]
    wanted = args.scenarios.split(",")
    rows, meta = [], {}
    for seed in (int(x) for x in args.seeds.split(",")):
        for name, pool_text, phase_s in scenarios:
            if name in wanted:
                scenario_rows, meta[f"{name}/seed{seed}"] = run_scenario(name, pool_text, phase_s, args.load, seed,
                                                                         profile_error, console)
                rows += scenario_rows
    table = Table("scenario", "seed", "policy", "phase", "jobs/s", "vs oracle", "p95 (s)", "SLO met", title="SIMULATED elastic scheduling")
    for r in rows:
        table.add_row(r["scenario"], str(r["seed"]), r["policy"], r["phase"], f"{r['throughput']:.3g}", f"{r['throughput_vs_oracle']:.2f}", f"{r['p95_s']:.3g}", f"{r['slo']:.0%}")
    console.print(table)
    goals = {}
    for key in meta:
        name, seed = key.split("/seed")
        mine = [r for r in rows if r["scenario"] == name and r["seed"] == int(seed)]
        hybrid = [r for r in mine if r["policy"] == "hybrid"]
        slo_by_policy = {
            p: sum(r["slo"] * r["jobs"] for r in mine if r["policy"] == p) / sum(r["jobs"] for r in mine if r["policy"] == p)
            for p in POLICIES
        }
        goals[key] = {
            "hybrid_min_throughput_vs_oracle": min(r["throughput_vs_oracle"] for r in hybrid),
            "slo_by_policy": {p: round(v, 4) for p, v in slo_by_policy.items()},
            "best_slo_non_oracle": max((p for p in POLICIES if p != "oracle"), key=slo_by_policy.get),
        }
    console.print(f"command: PYTHONPATH=. python bench/elastic_sim.py{' --quick' if args.quick else ''} --seeds {args.seeds} "
                  f"--scenarios {args.scenarios} --profile-error '{args.profile_error}'")
    print(json.dumps({"bench": "elastic_sim", "simulated": True, "quick": args.quick, "profile_error": profile_error,
                      "scenarios": meta, "goals": goals, "rows": rows}))


if __name__ == "__main__":
    main()
