"""Liveness that means something: a service touches its health file only while it is connected
to NATS, its consumers are bound and its loops are alive, so a stale file means "not serving",
whatever the process table says. A service that knows it is broken (a stage worker whose pull
has stalled while work is queued, or one of whose loops died) says so at once: it writes
``unhealthy: <why>`` instead. ``python -m disagfusion.health`` is the container HEALTHCHECK."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

DEFAULT_PATH = Path("/tmp/disagfusion-health")
MAX_AGE_S = 15.0
UNHEALTHY = "unhealthy:"


def health_path() -> Path:
    return Path(os.environ.get("DF_HEALTH_FILE", str(DEFAULT_PATH)))


def write_health(path: Path, detail: str = "serving") -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{detail}\n")
    tmp.replace(path)


def write_unhealthy(path: Path, reason: str) -> None:
    """Say at once that this service is not serving, and why."""
    write_health(path, f"{UNHEALTHY} {reason}")


def health_age(path: Path | None, max_age_s: float = MAX_AGE_S) -> float | None:
    """Seconds since the last healthy heartbeat, or None if there is none within ``max_age_s``
    (or the service says it is unhealthy)."""
    if path is None:
        return None
    try:
        age = time.time() - path.stat().st_mtime
        unhealthy = path.read_text().startswith(UNHEALTHY)
    except FileNotFoundError:
        return None
    return age if age <= max_age_s and not unhealthy else None


def main() -> int:
    path = health_path()
    age = health_age(path)
    if age is None:
        try:
            detail = path.read_text().strip()
        except FileNotFoundError:
            detail = ""
        reason = detail if detail.startswith(UNHEALTHY) else f"unhealthy: no heartbeat in {path} within {MAX_AGE_S:.0f} s"
        print(reason, file=sys.stderr)
        return 1
    print(f"healthy: last heartbeat {age:.1f} s ago")
    return 0


if __name__ == "__main__":
    sys.exit(main())
