"""EMULATED stage start-up: seconds from spawning a stage process to its first heartbeat (NATS
connected, consumers bound, model loaded: what the launcher's health check and the local
actuator wait for), one process alone and several at once, on the embedded stack serving the
emulated model of bench/elastic.py. This is the start-up the elastic scheduler and its
simulation must assume on this machine (``DF_SCHED_STARTUP_S``).

Reproduce: PYTHONPATH=. python bench/startup.py [--quick] [--together 6]
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elastic import ELASTIC_PROFILE, MODEL  # noqa: E402

from disagfusion.health import health_age  # noqa: E402
from disagfusion.launcher import Launcher  # noqa: E402
from disagfusion.models.emulated import PIXART_SIGMA_GEOMETRY, write_model  # noqa: E402


def start(launcher: Launcher, service: str, extra: int) -> list[float]:
    """Grow ``service`` by ``extra`` processes at once; seconds until each new one is healthy."""
    before = {p.pid for p in launcher.state().services.get(service, [])}
    started = time.monotonic()
    launcher.scale(service, len(before) + extra, wait=False)
    new = [p for p in launcher.state().services[service] if p.pid not in before]
    ready: dict[int, float] = {}
    while len(ready) < len(new):
        if time.monotonic() - started > 180:
            raise RuntimeError(f"{service}: not healthy within 180 s")
        for p in new:
            if p.pid not in ready and health_age(p.health_file) is not None:
                ready[p.pid] = time.monotonic() - started
        time.sleep(0.05)
    return sorted(ready.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repetition")
    parser.add_argument("--together", type=int, default=6, help="processes started at once")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    console = Console(stderr=True)
    repeat = 1 if args.quick else args.repeat
    os.environ["DF_MODELS"] = MODEL
    load = os.getloadavg()
    alone: dict[str, list[float]] = {}
    together: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="df-startup-") as tmp:
        work = Path(tmp)
        write_model(work / "models" / MODEL, PIXART_SIGMA_GEOMETRY, ELASTIC_PROFILE)
        launcher = Launcher(work / "stack", models_dir=work / "models")
        started = time.monotonic()
        launcher.up({"encoder": 1, "dit": 1, "decoder": 1})
        console.print(f"stack up (1 per stage) in {time.monotonic() - started:.1f} s; load average {load[0]:.2f}")
        try:
            for service in ("encoder", "dit", "decoder"):
                for _ in range(repeat):
                    alone.setdefault(service, []).extend(start(launcher, service, 1))
                    launcher.scale(service, 1)
                    together.setdefault(service, []).extend(start(launcher, service, args.together))
                    launcher.scale(service, 1)
                console.print(f"  {service}: alone {statistics.median(alone[service]):.1f} s (median); "
                              f"{args.together} at once: first {min(together[service]):.1f} s, "
                              f"last {max(together[service]):.1f} s")
        finally:
            launcher.down(timeout=30)
    result = {
        "bench": "startup", "emulated": True, "quick": args.quick, "together": args.together, "repeat": repeat,
        "load_avg_1m_before": round(load[0], 2), "cpus": os.cpu_count(),
        "alone_s": {s: [round(x, 2) for x in v] for s, v in alone.items()},
        "together_s": {s: [round(x, 2) for x in v] for s, v in together.items()},
        "alone_median_s": round(statistics.median(x for v in alone.values() for x in v), 2),
        "together_last_median_s": round(statistics.median(max(v[i:i + args.together]) for v in together.values()
                                                          for i in range(0, len(v), args.together)), 2),
    }
    console.print(f"command: PYTHONPATH=. python bench/startup.py{' --quick' if args.quick else ''} --together {args.together}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
