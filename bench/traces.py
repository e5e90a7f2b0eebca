"""Workload traces for the scheduler benchmarks: the four-phase shift of the elastic issue.

1. many small images (DiT-bound, short jobs)       2. few large images, few steps (decoder-heavy)
3. long video-like DiT jobs (frames > 1)           4. long prompts with few steps (encoder-bound)

Each phase's arrival rate is ``load`` times what the pool could serve of that phase's mix with
its best placement, so a policy that gets the ratio right keeps up and one that does not falls
behind. Arrivals are Poisson, seeded: the same arguments give the same trace.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from disagfusion.config import ModelSettings
from disagfusion.cost import load_profiles
from disagfusion.protocol import STAGES, JobSpec
from services.scheduler.config import SchedulerSettings
from services.scheduler.controller import Controller
from services.scheduler.pool import Pool, capacity, parse_pool
from services.scheduler.predictor import Predictor
from services.scheduler.trace import TraceEntry, write_trace

VIDEO_MODEL = "wan2_1-t2v-1_3b"
IMAGE_MODEL = "image"


def _prompt(chars: int, rng: random.Random) -> str:
    words = ["a", "quiet", "harbour", "at", "dawn", "with", "fishing", "boats", "soft", "light", "mist", "gulls"]
    text = ""
    while len(text) < chars:
        text += rng.choice(words) + " "
    return text[:chars].strip()


def phase_specs() -> list[tuple[str, dict]]:
    """(phase label, JobSpec fields) of the four phases, in order."""
    return [
        ("1-small-images", dict(model=IMAGE_MODEL, height=512, width=512, steps=20, guidance=5.0, prompt=60)),
        ("2-large-images", dict(model=IMAGE_MODEL, height=2048, width=2048, steps=8, guidance=1.0, prompt=60)),
        ("3-video", dict(model=VIDEO_MODEL, height=480, width=832, frames=33, steps=30, guidance=5.0, prompt=120)),
        ("4-long-prompts", dict(model=IMAGE_MODEL, height=1024, width=1024, steps=4, guidance=0.0, prompt=2000)),
    ]


def phase_capacity(spec: JobSpec, pool: Pool, predictor: Predictor) -> float:
    """Jobs per second the pool serves of ``spec`` alone, placed in the ratio of its stage costs."""
    costs = dict(zip(STAGES, predictor.job_costs(spec)))
    placed = Controller(pool, SchedulerSettings(fill_pool=True)).place(costs, {})
    return min(capacity(placed, pool, s) / costs[s] for s in STAGES)


def four_phase_trace(pool: Pool, phase_s: float, load: float = 0.8, seed: int = 0) -> list[TraceEntry]:
    rng = random.Random(seed)
    predictor = Predictor(load_profiles([ModelSettings().profiles_dir]).values())
    entries: list[TraceEntry] = []
    for k, (label, fields) in enumerate(phase_specs()):
        chars = fields.pop("prompt")
        prompt = _prompt(chars, rng)
        rate = load * phase_capacity(JobSpec(prompt=prompt, **fields), pool, predictor)
        t, start, n = k * phase_s, k * phase_s, 0
        while True:
            t += rng.expovariate(rate)
            if t >= start + phase_s:
                break
            spec = JobSpec(job_id=f"p{k + 1}-{n}", prompt=prompt, seed=n, **fields)
            entries.append(TraceEntry(t=round(t, 4), spec=spec, phase=label))
            n += 1
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--pool", default="slot:12")
    parser.add_argument("--phase-s", type=float, default=600.0)
    parser.add_argument("--load", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    entries = four_phase_trace(parse_pool(args.pool), args.phase_s, args.load, args.seed)
    write_trace(args.out, entries)
    print(f"{len(entries)} jobs written to {args.out}")


if __name__ == "__main__":
    main()
