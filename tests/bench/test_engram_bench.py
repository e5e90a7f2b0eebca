"""bench/engram.py --quick runs end to end against real servers and reports every figure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_engram_bench_reports_every_source_and_batch() -> None:
    before = {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("df-engram-bench")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "engram.py"), "--quick"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "engram" and summary["quick"] is True
    seen = {(r["source"], r.get("reply", r.get("ids")), r["batch"]) for r in summary["rows"]}
    for batch in (1, 64, 4096, 65536):
        for source, variant in (
            ("dram", "uint32"), ("dram", "int64"), ("arena", "uint32"), ("arena", "int64"),
            ("nats", "shm"), ("nats", "chunks"), ("redis", None),
        ):
            assert (source, variant, batch) in seen
    for row in summary["rows"]:
        assert row["rows_per_s"] > 0 and row["gbps"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert {(p["source"], p["window_ms"]) for p in summary["prefetch"]} >= {("arena", w) for w in (0.05, 0.5, 5.0)}
    for ids in ("uint32", "int64"):
        assert set(summary["goals"][f"arena_vs_dram_{ids}_ids"]) == {"1", "64", "4096", "65536"}
    after = {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("df-engram-bench")}
    assert after <= before, f"the bench left {after - before} in /dev/shm"
