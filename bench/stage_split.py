"""How a job's compute time splits across the encode, denoise and decode stages of a model.

Loads each stage of the model the way the services do (``load_stage_model``), runs one job
through them in this process, and reports the median seconds per stage over several runs (after
one warm-up run). Real models spend most of a job in the DiT, most of the rest in the VAE
decoder; the ``small`` preset is sized to do the same.

    PYTHONPATH=$PWD python bench/stage_split.py [--model small] [--threads 1] [--quick]
        [--profile deploy/profiles/small-cpu.yaml]

With ``--profile`` (a cost profile file, e.g. one ``disagfusion profile`` wrote) it prints
the predictor's time for the job beside each measured stage: a check of the profile on a job
outside the grid it was fitted on.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from disagfusion.config import Settings
from disagfusion.cost import CostProfile
from disagfusion.models import load_stage_model
from disagfusion.protocol import STAGES, JobSpec
from services.scheduler.predictor import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = one core)")
    parser.add_argument("--quick", action="store_true", help="2 timed runs instead of --runs")
    parser.add_argument("--profile", type=Path, help="cost profile file whose prediction to print beside each stage")
    args = parser.parse_args()
    runs = 2 if args.quick else args.runs
    torch.set_num_threads(args.threads)

    settings = Settings()  # DF_MODELS_DIR, DF_DEVICE, DF_DTYPE as the services read them
    models = {stage: load_stage_model(args.model, stage, settings) for stage in STAGES}
    spec = JobSpec(
        model=args.model, prompt="a lighthouse on a cliff at dusk, oil painting", seed=0,
        steps=args.steps, height=args.height, width=args.width, guidance=args.guidance,
    )
    seconds: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for run in range(runs + 1):
        tensors: list[dict[str, torch.Tensor]] = [{}]
        for stage in STAGES:
            start = time.perf_counter()
            tensors = models[stage].run([spec], tensors)
            if run:  # run 0 warms up
                seconds[stage].append(time.perf_counter() - start)

    median = {stage: statistics.median(times) for stage, times in seconds.items()}
    total = sum(median.values())
    where = f"{settings.device} ({platform.processor() or platform.machine()}), {args.threads} thread(s), {settings.dtype}"
    print(f"stage split of model {args.model!r}: {args.height}x{args.width}, {args.steps} steps, "
          f"guidance {args.guidance}; median of {runs} runs on {where}")
    predicted = dict(zip(STAGES, Predictor([CostProfile.load(args.profile)]).job_costs(spec))) if args.profile else {}
    for stage in STAGES:
        line = f"  {stage:<8} {median[stage]:7.3f} s  {100 * median[stage] / total:5.1f} %"
        if predicted:
            line += f"   predicted {predicted[stage]:7.3f} s ({predicted[stage] / median[stage] - 1:+.0%})"
        print(line)
    print(f"  {'total':<8} {total:7.3f} s" + (f"{'':11}predicted {sum(predicted.values()):7.3f} s" if predicted else ""))
    print(json.dumps({
        "bench": "stage_split", "model": args.model, "device": settings.device, "dtype": settings.dtype,
        "threads": args.threads, "height": args.height, "width": args.width, "steps": args.steps,
        "guidance": args.guidance, "runs": runs,
        **{f"{stage}_s": round(median[stage], 4) for stage in STAGES},
        "total_s": round(total, 4),
        **{f"{stage}_share": round(median[stage] / total, 3) for stage in STAGES},
        **({"profile": str(args.profile), **{f"predicted_{stage}_s": round(p, 4) for stage, p in predicted.items()}}
           if predicted else {}),
    }))


if __name__ == "__main__":
    main()
