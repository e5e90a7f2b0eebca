"""Workload traces: JSONL, one job a line, ``{"t": arrival seconds, "spec": JobSpec fields}``
and optionally ``"phase"``, a label results are grouped by."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel

from disagfusion.protocol import JobSpec


class TraceEntry(BaseModel):
    t: float
    spec: JobSpec
    phase: str | None = None


def read_trace(path: Path) -> list[TraceEntry]:
    entries = []
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    entries.append(TraceEntry.model_validate_json(line))
                except ValueError as exc:
                    raise ValueError(f"{path}:{number}: {exc}") from exc
    return sorted(entries, key=lambda e: e.t)


def write_trace(path: Path, entries: Iterable[TraceEntry]) -> None:
    with path.open("w") as out:
        for entry in entries:
            out.write(json.dumps(entry.model_dump(mode="json", exclude_defaults=False)) + "\n")
