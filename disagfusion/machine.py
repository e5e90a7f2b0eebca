"""What a measurement ran on: for a benchmark's printout and JSON line, and for the ``source`` of
a measured cost profile (``disagfusion.profiling``)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def describe() -> dict[str, object]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    info: dict[str, object] = {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
                               "python": platform.python_version(), "torch": torch.__version__,
                               "load_average_1m": round(os.getloadavg()[0], 2)}  # others' load: noise in every figure
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
