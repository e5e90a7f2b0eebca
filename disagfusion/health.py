"""Liveness that means something: a service touches its health file only while it is connected
to NATS and its consumers are bound, so a stale file means "not serving", whatever the process
table says. ``python -m disagfusion.health`` is the container HEALTHCHECK."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

DEFAULT_PATH = Path("/tmp/disagfusion-health")
MAX_AGE_S = 15.0


def health_path() -> Path:
    return Path(os.environ.get("DF_HEALTH_FILE", str(DEFAULT_PATH)))


def write_health(path: Path, detail: str = "serving") -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{detail}\n")
    tmp.replace(path)


def health_age(path: Path | None, max_age_s: float = MAX_AGE_S) -> float | None:
    """Seconds since the last heartbeat, or None if there is none within ``max_age_s``."""
    if path is None:
        return None
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    return age if age <= max_age_s else None


def main() -> int:
    path = health_path()
    age = health_age(path)
    if age is None:
        print(f"unhealthy: no heartbeat in {path} within {MAX_AGE_S:.0f} s", file=sys.stderr)
        return 1
    print(f"healthy: last heartbeat {age:.1f} s ago")
    return 0


if __name__ == "__main__":
    sys.exit(main())
