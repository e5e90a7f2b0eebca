"""bench/fleet.py runs end to end and reports what it promises: every scenario in both modes at
both loads, labelled emulated, and a short live run of the offload scenario on 12 emulated slots
per mode (its figures are judged only where the emulation fixes them: the monolithic pipelines'
sleeps bound their throughput, and offloading makes them several times slower)."""

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
    rows = [row for row in report["rows"] if row["source"] == "emulated-simulated"]
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
    # The live run: the offload scenario, both modes on 12 slots, every job done, beside the
    # simulation of the same trace.
    live = {row["mode"]: row for row in report["rows"] if row["source"] == "emulated-live"}
    assert set(live) == {"disaggregated", "monolithic"}
    assert all(r["scenario"] == "emulated-sd3.5-large-turbo-12x24gb" and r["slots"] == 12 for r in live.values())
    assert sum(live["disaggregated"]["scales"].values()) == 12 and live["monolithic"]["scales"] == {"pipeline": 12}
    assert all(r["completed"] == r["jobs"] and r["failed"] == 0 for r in live.values())
    assert live["monolithic"]["stage_s"]["encode"] > 10 * live["disaggregated"]["stage_s"]["encode"]  # the offload
    assert 0.7 < live["monolithic"]["live_sim_ratio"]["throughput"] < 1.3
    assert live["disaggregated"]["throughput"] > 2 * live["monolithic"]["throughput"]
