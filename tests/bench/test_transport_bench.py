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
    seen = {(row["transport"], row["bytes"]) for row in report["rows"]}
    for size in sizes:
        assert {("shm", size), ("redis", size)} <= seen
        assert (("inline", size) in seen) == (size <= 1 << 20)
    for row in report["rows"]:
        assert set(row) >= {"transport", "bytes", "seconds", "gbps", "memcpy_gbps"}
        assert row["seconds"] > 0 and row["gbps"] > 0 and row["memcpy_gbps"] > 0
        assert abs(row["gbps"] - row["bytes"] / row["seconds"] / 1e9) <= 0.01 * row["gbps"] + 0.002
    assert set(report["shm_breakdown_64MiB"]) >= {"checksum", "put", "get", "delete"}
