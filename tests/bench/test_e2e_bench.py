"""bench/e2e.py runs end to end, both modes at every rate, every job completed, and reports what
it promises (its speed is not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_ends_with_one_json_line() -> None:
    done = subprocess.run([sys.executable, "bench/e2e.py", "--quick", "--jobs", "6"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["bench"] == "e2e" and report["model"] == "tiny"
    assert "load average" in report["uptime_before"] and "bench/e2e.py" in report["command"]
    rows = {(row["mode"], row["rate_x_bound"]): row for row in report["rows"]}
    assert set(rows) == {(mode, rate) for mode in ("disaggregated", "monolithic") for rate in (0.6, 1.3)}
    for row in rows.values():
        assert row["completed"] == row["jobs"] == 6 and not row["failed"]
        assert row["throughput"] > 0 and row["p50_s"] <= row["p95_s"] <= row["p99_s"]
        assert abs(row["efficiency"] - row["throughput"] / row["bound"]) < 0.01
        assert abs(row["rate"] - row["rate_x_bound"] * row["bound"]) < 0.01
        assert set(row["waited_s"]) == set(row["computed_s"]) == {"encode", "denoise", "decode"}
        assert all(seconds > 0 for seconds in row["computed_s"].values())
    assert len(report["ratios"]) == 2
