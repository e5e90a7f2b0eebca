"""The hardware budget: device classes, how many of each, which stages each may host and how
fast it runs them relative to the profile's reference device; and ``Allocation``, how many
instances of each stage run on each class."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field

from disagfusion.protocol import STAGES


class DeviceClass(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    count: int = Field(ge=0)
    stages: tuple[str, ...] = STAGES
    speed: float = Field(default=1.0, gt=0)
    """Throughput relative to the device the cost profile was measured on."""

    def speed_for(self, stage: str) -> float:
        return self.speed if stage in self.stages else 0.0


# Rough relative speeds for common classes, reference H200 (where SGLang measured Wan2.1). They
# are starting points, not measurements: pass ``name:count:stages:speed`` to override.
KNOWN_CLASSES: dict[str, tuple[tuple[str, ...], float]] = {
    "slot": (STAGES, 1.0),  # one emulated accelerator, the unit of the local fleet
    "h200": (STAGES, 1.0),
    "h100": (STAGES, 0.85),
    "a100": (STAGES, 0.45),
    "l40s": (STAGES, 0.4),
    "l4": (("encode", "decode"), 0.2),  # 24 GB: text encoder and VAE yes, a video DiT no
}


class Pool(BaseModel):
    model_config = ConfigDict(frozen=True)

    classes: tuple[DeviceClass, ...]

    @property
    def total(self) -> int:
        return sum(c.count for c in self.classes)

    def by_name(self) -> dict[str, DeviceClass]:
        return {c.name: c for c in self.classes}

    def preference(self, stage: str) -> list[DeviceClass]:
        """Classes that may host ``stage``, the one most suited to it first: comparative advantage
        (its speed here over its mean speed on all stages) keeps big GPUs free for the DiT."""

        def advantage(c: DeviceClass) -> tuple[float, float]:
            mean = sum(c.speed_for(s) for s in STAGES) / len(STAGES)
            return (c.speed_for(stage) / mean, c.speed_for(stage))

        return sorted((c for c in self.classes if stage in c.stages and c.count > 0), key=advantage, reverse=True)


def parse_pool(text: str) -> Pool:
    """``h100:64,l4:256`` or, to override the defaults, ``l4:256:encode+decode:0.25``."""
    classes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        fields = part.split(":")
        if len(fields) < 2 or len(fields) > 4:
            raise ValueError(f"pool entry {part!r}: expected name:count[:stage+stage][:speed]")
        name, count = fields[0], int(fields[1])
        stages, speed = KNOWN_CLASSES.get(name, (STAGES, 1.0))
        if len(fields) >= 3 and fields[2]:
            stages = tuple(fields[2].split("+"))
            unknown = set(stages) - set(STAGES)
            if unknown:
                raise ValueError(f"pool entry {part!r}: unknown stages {sorted(unknown)}")
        if len(fields) == 4:
            speed = float(fields[3])
        classes.append(DeviceClass(name=name, count=count, stages=stages, speed=speed))
    if not classes:
        raise ValueError("empty pool")
    return Pool(classes=tuple(classes))


Allocation = dict[str, dict[str, int]]
"""stage → device class → instances."""


def empty_allocation() -> Allocation:
    return {s: {} for s in STAGES}


def per_stage(allocation: Allocation) -> dict[str, int]:
    return {s: sum(allocation.get(s, {}).values()) for s in STAGES}


def per_class(allocation: Allocation) -> dict[str, int]:
    used: dict[str, int] = {}
    for by_class in allocation.values():
        for name, n in by_class.items():
            used[name] = used.get(name, 0) + n
    return used


def capacity(allocation: Allocation, pool: Pool, stage: str) -> float:
    """Reference-device instance equivalents serving ``stage``."""
    classes = pool.by_name()
    return sum(n * classes[name].speed_for(stage) for name, n in allocation.get(stage, {}).items())


def deployment_replicas(allocation: Allocation, pool: Pool, template: str) -> dict[str, int]:
    """One workload per (stage, class) for actuators that name them, e.g. ``dit-h100``; every
    (stage, class) the pool allows appears, so scaling to zero is explicit."""
    replicas = {}
    for stage in STAGES:
        for c in pool.classes:
            if stage in c.stages:
                name = template.format(service=stage.service, device=c.name, stage=stage)
                replicas[name] = replicas.get(name, 0) + allocation.get(stage, {}).get(c.name, 0)
    return replicas


def fit_to_pool(wanted: Mapping[str, int], pool: Pool, order: Iterable[str] = STAGES) -> Allocation:
    """Place per-stage instance counts on the pool, preferred classes first; what does not fit
    is trimmed in proportion (the cluster would leave those pods pending)."""
    total = sum(wanted.values())
    scale = min(1.0, pool.total / total) if total else 1.0
    free = {c.name: c.count for c in pool.classes}
    allocation = empty_allocation()
    for stage in order:
        need = math.floor(wanted.get(stage, 0) * scale) if scale < 1 else wanted.get(stage, 0)
        if wanted.get(stage, 0) > 0:
            need = max(need, 1)
        for c in pool.preference(stage):
            take = min(need, free[c.name])
            if take:
                allocation[stage][c.name] = take
                free[c.name] -= take
                need -= take
    return allocation
