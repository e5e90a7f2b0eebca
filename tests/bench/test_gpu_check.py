"""The GPU check's models (bench/gpu/full_size.py): with ``--tiny`` the same builders write
directories that every stage loads the way the services do and runs in bfloat16, so the full-size
run on a lent GPU meets no surprise but its size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from disagfusion.config import Settings
from disagfusion.models import load_stage_model, weight_bytes
from disagfusion.protocol import STAGES, JobSpec

ROOT = Path(__file__).resolve().parents[2]

JOBS = {
    "wan2_1-t2v-1_3b-random": dict(height=32, width=32, frames=5),
    "sd3_5-medium-random": dict(height=64, width=64, frames=1),
}


def test_tiny_full_size_builds_serve_every_stage(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "bench/gpu/full_size.py", "--models-dir", str(tmp_path), "--tiny"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["model"] for row in report["models"]] == list(JOBS)
    settings = Settings(models_dir=tmp_path, dtype="bfloat16")
    for model, shape in JOBS.items():
        assert all(size > 0 for size in weight_bytes(model, settings).values())
        spec = JobSpec(model=model, prompt="a lighthouse at dusk", seed=1, steps=2, guidance=5.0, **shape)
        tensors: list[dict] = [{}]
        for stage in STAGES:
            tensors = load_stage_model(model, stage, settings).run([spec], tensors)
        frames = tensors[0]["video"] if "video" in tensors[0] else tensors[0]["image"][None]
        assert frames.numpy().dtype == np.uint8 and frames.shape == (shape["frames"], shape["height"], shape["width"], 3)
