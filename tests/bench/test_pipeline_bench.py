"""bench/pipeline.py runs end to end and reports what it promises (its speed is not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_ends_with_one_json_line() -> None:
    done = subprocess.run([sys.executable, "bench/pipeline.py", "--quick", "--jobs", "8", "--dit", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["bench"] == "pipeline_emulated"
    rows = {(row["mode"], row["delay"]): row for row in report["rows"]}
    assert set(rows) == {(mode, delay) for mode in ("async", "sync") for delay in ("0", "50ms", "50+-40ms")}
    for row in rows.values():
        assert row["bound"] == 5.0  # one dit instance at 200 ms per job
        assert row["throughput"] > 0
        assert abs(row["efficiency"] - row["throughput"] / row["bound"]) < 0.01
