"""bench/elastic.py runs end to end (a live emulated fleet under the scheduler service, and the
simulation of the same trace) and reports what it promises; its figures are not judged here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_ends_with_one_json_line() -> None:
    # 6 s phases rather than --quick's 15: enough for every phase to serve jobs, and the suite
    # stays within its 10 minutes.
    done = subprocess.run([sys.executable, "bench/elastic.py", "--quick", "--phase-s", "6"], cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["bench"] == "elastic" and report["emulated_live"] == ["hybrid"]
    simulated = {(r["policy"], r["phase"]) for r in report["rows"] if r["mode"] == "simulated"}
    assert {p for p, _ in simulated} == {"static", "lag", "threshold", "predictor", "hybrid", "oracle"}
    live = [r for r in report["rows"] if r["mode"] == "emulated-live"]
    assert [r["phase"] for r in live] == ["1-small-images", "2-large-images", "3-video", "4-long-prompts"]
    assert all(r["jobs"] > 0 for r in live)
    assert live[0]["completed"] > 0 and live[0]["throughput"] > 0  # the live fleet served jobs
    assert all(r["live_vs_sim"] == pytest.approx(r["throughput"] / r["sim_throughput"], rel=0.01) for r in live)
    timeline = report["live_timelines"]["hybrid"]
    assert timeline and {"encoder", "dit", "decoder"} <= set(timeline[0])
