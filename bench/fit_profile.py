"""Measure a model's stages on this machine over a small grid of specs and fit a CostProfile.

    PYTHONPATH=. python bench/fit_profile.py --model small --out deploy/profiles/small-cpu.json

Runs every stage of ``--model`` (a preset or a directory under DF_MODELS_DIR) in this process,
for a grid of prompt lengths, sizes, steps, guidance on/off and batch sizes 1 and 2; takes the
fastest of ``--repeats`` runs per point (on a shared machine, other load only ever adds time); fits ``disagfusion.profiles.fit_stage_cost`` per stage
and writes the profile with its ``source`` saying how it was measured. Prints each point's
measured and fitted time, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from disagfusion.config import Settings
from disagfusion.models import load_stage_model
from disagfusion.models.base import StageModel, Tensors
from disagfusion.profiles import CostProfile, Observation, fit_stage_cost
from disagfusion.protocol import JobSpec
from machine import describe

PROMPTS = ("a cat", "a watercolour painting of a lighthouse on a cliff at dusk, seagulls, warm light, " * 2)


def timed(model: StageModel, specs: list[JobSpec], inputs: list[Tensors], repeats: int) -> tuple[float, list[Tensors]]:
    model.run(specs, inputs)  # warm-up: first calls allocate and pick kernels
    times, outputs = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = model.run(specs, inputs)
        times.append(time.perf_counter() - started)
    return min(times), outputs


def grid(quick: bool) -> list[list[JobSpec]]:
    sizes = (128, 256) if quick else (128, 256, 384)
    steps = (2, 4)
    batches = []
    for size in sizes:
        for n_steps in steps:
            for guidance in (1.0, 4.5):
                for batch in (1, 2):
                    spec = dict(height=size, width=size, steps=n_steps, guidance=guidance)
                    batches.append([JobSpec(prompt=PROMPTS[i % 2], seed=i, **spec) for i in range(batch)])
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--out", default=None, help="where to write the profile JSON")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings()
    info = describe()
    hardware = f"{info['cpu']} CPU, {args.threads} torch thread(s) of {info['cores']} cores"
    command = " ".join([os.path.basename(sys.executable), *sys.argv])
    print(f"# fitting {args.model} on {hardware}; torch {torch.__version__}\n# reproduce: PYTHONPATH=. {command}")

    models = {stage: load_stage_model(args.model, stage, settings) for stage in ("encode", "denoise", "decode")}
    observations: dict[str, list[Observation]] = {stage: [] for stage in models}
    for batch in grid(args.quick):
        specs = [spec.model_copy(update={"model": args.model}) for spec in batch]
        seconds, encoded = timed(models["encode"], specs, [{} for _ in specs], args.repeats)
        observations["encode"].append((specs, seconds))
        seconds, denoised = timed(models["denoise"], specs, encoded, args.repeats)
        observations["denoise"].append((specs, seconds))
        seconds, _ = timed(models["decode"], specs, denoised, args.repeats)
        observations["decode"].append((specs, seconds))

    stages = {
        "encode": fit_stage_cost(observations["encode"], per_step=False, cfg_factor=2.0,
                                 use=("fixed_s", "per_job_s")),  # PixArt pads every prompt to 300 tokens
        "denoise": fit_stage_cost(observations["denoise"], per_step=True, cfg_factor=2.0),
        "decode": fit_stage_cost(observations["decode"], per_step=False, use=("fixed_s", "per_job_s", "per_mpixel_s")),
    }
    rows = []
    for stage, points in observations.items():
        for specs, seconds in points:
            s = specs[0]
            predicted = stages[stage].seconds(specs)
            rows.append(dict(stage=stage, batch=len(specs), size=s.height, steps=s.steps, guidance=s.guidance,
                             measured_s=round(seconds, 5), fitted_s=round(predicted, 5)))
            print(f"{stage:8s} n={len(specs)} {s.height}px {s.steps} steps g={s.guidance}: "
                  f"measured {seconds * 1e3:8.1f} ms, fitted {predicted * 1e3:8.1f} ms")
    errors = {stage: statistics.median(abs(r["fitted_s"] / r["measured_s"] - 1) for r in rows if r["stage"] == stage)
              for stage in stages}
    error_text = ", ".join(f"{k} {v:.1%}" for k, v in errors.items())
    print(f"median relative fit error: {error_text}")
    profile = CostProfile(
        model=args.model,
        hardware=hardware,
        source=f"measured here ({time.strftime('%Y-%m-%d')}) on a shared development VM: fastest of {args.repeats} "
        f"runs per grid point, least-squares fit on relative error; median relative fit error {error_text}; "
        f"reproduce: PYTHONPATH=. {command}",
        stages=stages,
    )
    if args.out:
        profile.save(args.out)
        print(f"wrote {args.out}")
    print(json.dumps({"bench": "fit_profile", "model": args.model, "hardware": hardware,
                      "median_rel_error": errors, "profile": profile.model_dump(), "rows": rows}))


if __name__ == "__main__":
    main()
