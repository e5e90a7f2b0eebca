"""bench/transport.py runs end to end and reports what it promises (its speed is not judged here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_ends_with_one_json_line() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "bench/transport.py", "--quick", "--repeats", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "reproduce: PYTHONPATH=. python bench/transport.py" in done.stdout
    report = json.loads(lines[-1])
    assert not any(line.startswith("{") for line in lines[:-1])
    assert report["bench"] == "transport" and report["machine"]["cores"] >= 1
    sizes = [64 * 1024 * 4**k for k in range(6)]
    seen = {(row["transport"], row["path"], row["bytes"]) for row in report["rows"]}
    for size in sizes:
        assert {("shm", "copy", size), ("shm", "zero_copy", size), ("redis", "copy", size)} <= seen
        assert (("inline", "copy", size) in seen) == (size <= 1 << 20)
    for row in report["rows"]:
        assert set(row) >= {"transport", "path", "bytes", "seconds", "gbps", "memcpy_gbps", "ratio_to_memcpy"}
        assert row["seconds"] > 0 and row["gbps"] > 0 and row["memcpy_gbps"] > 0
        assert abs(row["gbps"] - row["bytes"] / row["seconds"] / 1e9) <= 0.01 * row["gbps"] + 0.002
        assert abs(row["ratio_to_memcpy"] - row["memcpy_seconds"] / row["seconds"]) <= 0.01 * row["ratio_to_memcpy"] + 0.002
    zero_copy = [r for r in report["rows"] if r["path"] == "zero_copy" and r["bytes"] >= 4 << 20]
    summary = report["summary"]
    assert summary["shm_zero_copy_min_ratio_to_memcpy_at_4MiB_plus"] == min(r["ratio_to_memcpy"] for r in zero_copy)
    assert summary["goal_shm_zero_copy_handoff_at_most_one_memcpy_at_4MiB_plus"] == (min(r["ratio_to_memcpy"] for r in zero_copy) >= 1.0)
    assert set(report["shm_breakdown_4MiB"]) >= {"checksum_not_done", "copy.put", "zero_copy.empty", "zero_copy.get"}
