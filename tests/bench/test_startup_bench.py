"""bench/startup.py starts real stage processes and reports their start-up (not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_times_every_new_process() -> None:
    done = subprocess.run([sys.executable, "bench/startup.py", "--quick", "--together", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["bench"] == "startup" and report["emulated"]
    for service in ("encoder", "dit", "decoder"):
        assert len(report["alone_s"][service]) == 1 and len(report["together_s"][service]) == 2
        assert all(0 < s < 180 for s in report["alone_s"][service] + report["together_s"][service])
