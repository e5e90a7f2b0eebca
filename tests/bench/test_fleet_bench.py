"""bench/fleet.py runs end to end and reports what it promises: every scenario in both modes at
both loads, labelled emulated (its figures are not judged here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_ends_with_one_json_line(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "bench/fleet.py", "--quick", "--export", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[-1])
    assert report["bench"] == "fleet-emulated" and report["simulated"] is True
    assert report["paper"] == {"throughput": [3.4, 20.5], "latency": 18.5}
    rows = report["rows"]
    assert all(set(row) >= {"scenario", "mode", "throughput", "p95_s", "load", "rate"} for row in rows)
    assert all(row["scenario"].startswith("emulated-") for row in rows)
    scenarios = {row["scenario"] for row in rows}
    assert {(row["scenario"], row["mode"], row["load"]) for row in rows} == {
        (s, m, load) for s in scenarios for m in ("disaggregated", "monolithic") for load in ("half", "saturated")}
    assert all(row["completed"] == row["jobs"] and row["throughput"] > 0 for row in rows)
    assert {r["scenario"] for r in report["ratios"]} == scenarios
    # The 14B DiT is never placed on the 24 GB class, and its monolithic pipeline there offloads it.
    wan14 = [r for r in rows if r["scenario"] == "emulated-wan14b-mixed"]
    assert all(set(r["placement"]["denoise"]) == {"gpu80"} for r in wan14 if r["mode"] == "disaggregated")
    assert all(r["offloaded"]["gpu24"] == ["denoise"] for r in wan14 if r["mode"] == "monolithic")
    # The exported profile and trace reproduce a row through the command line.
    assert (tmp_path / "profiles" / "wan2_1-t2v-14b.yaml").is_file()
    assert (tmp_path / "emulated-wan14b-mixed-half.jsonl").is_file()
