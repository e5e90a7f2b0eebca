"""bench/handoff.py runs end to end and reports what it promises (its speed is not judged here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_times_every_way_at_every_size() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "bench/handoff.py", "--quick", "--repeats", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "reproduce: PYTHONPATH=. python bench/handoff.py" in done.stdout and "load average" in done.stdout
    report = json.loads(lines[-1])
    assert report["bench"] == "handoff" and report["command"].startswith("PYTHONPATH=. python bench/handoff.py")
    sizes = {256 * 1024, 4096 * 1024}
    assert {(row["way"], row["bytes"]) for row in report["rows"]} == {(w, s) for w in ("shm", "redis", "pull") for s in sizes}
    for row in report["rows"]:
        assert row["seconds"] > 0 and abs(row["gbps"] - row["bytes"] / row["seconds"] / 1e9) <= 0.01 * row["gbps"] + 0.002
        shm = next(r for r in report["rows"] if r["way"] == "shm" and r["bytes"] == row["bytes"])
        assert abs(row["cost_vs_shm"] - row["seconds"] / shm["seconds"]) <= 0.01 * row["cost_vs_shm"] + 0.01
