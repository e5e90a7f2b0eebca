"""The hardware budget: device classes, how many of each, which stages each may host, how
fast it runs them relative to the profile's reference device and how much memory it has; and
``Allocation``, how many instances of each stage run on each class."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field

from disagfusion.memory import GB, StageMemory
from disagfusion.protocol import STAGES


class DeviceClass(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    count: int = Field(ge=0)
    stages: tuple[str, ...] = STAGES
    speed: float = Field(default=1.0, gt=0)
    """Throughput relative to the device the cost profile was measured on."""
    memory_gb: float | None = Field(default=None, gt=0)
    """Device memory (decimal GB); None: unknown, every stage fits (an emulated slot)."""

    def speed_for(self, stage: str) -> float:
        return self.speed if stage in self.stages else 0.0

    def fits(self, need: StageMemory) -> bool:
        return self.memory_gb is None or need.total_bytes <= self.memory_gb * GB


# Rough relative speeds for common classes, reference H200 (where SGLang measured Wan2.1), and
# their data sheets' memory. The speeds are starting points, not measurements: pass
# ``name:count:stages:speed:memory_gb`` to override.
KNOWN_CLASSES: dict[str, tuple[tuple[str, ...], float, float | None]] = {
    "slot": (STAGES, 1.0, None),  # one emulated accelerator, the unit of the local fleet
    "h200": (STAGES, 1.0, 141.0),
    "h100": (STAGES, 0.85, 80.0),
    "a100": (STAGES, 0.45, 80.0),
    "l40s": (STAGES, 0.4, 48.0),
    "l4": (("encode", "decode"), 0.2, 24.0),  # too slow for a video DiT even where one fits
}


class PlacementError(ValueError):
    """A stage that no device class of the pool can hold."""


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

    def fitted(self, needs: Mapping[str, StageMemory]) -> Pool:
        """This pool with each class hosting only the stages whose memory need it can hold, so
        every placement made on it (the controller's, ``fit_to_pool``, the oracle's) puts a stage
        only where it fits. Raises ``PlacementError`` for a stage that fits on no class."""
        classes = tuple(
            c.model_copy(update={"stages": tuple(s for s in c.stages if s not in needs or c.fits(needs[s]))})
            for c in self.classes
        )
        for stage, need in needs.items():
            hosts = [c for c in self.classes if stage in c.stages and c.count > 0]
            if hosts and not any(c.fits(need) for c in hosts):
                largest = max(hosts, key=lambda c: c.memory_gb or 0.0)
                raise PlacementError(
                    f"stage {stage} of {need.model} needs {need.describe()}, more than any device class "
                    f"that may host it has (largest: {largest.name}, {largest.memory_gb:g} GB): add a larger "
                    f"class to the pool, or serve a smaller variant")
        return Pool(classes=classes)


def parse_pool(text: str) -> Pool:
    """``h100:64,l4:256`` or, to override the defaults, ``l4:256:encode+decode:0.25:24``
    (stages, speed and memory in GB; an empty field keeps the default)."""
    classes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        fields = part.split(":")
        if len(fields) < 2 or len(fields) > 5:
            raise ValueError(f"pool entry {part!r}: expected name:count[:stage+stage][:speed][:memory_gb]")
        name, count = fields[0], int(fields[1])
        stages, speed, memory_gb = KNOWN_CLASSES.get(name, (STAGES, 1.0, None))
        if len(fields) >= 3 and fields[2]:
            stages = tuple(fields[2].split("+"))
            unknown = set(stages) - set(STAGES)
            if unknown:
                raise ValueError(f"pool entry {part!r}: unknown stages {sorted(unknown)}")
        if len(fields) >= 4 and fields[3]:
            speed = float(fields[3])
        if len(fields) == 5 and fields[4]:
            memory_gb = float(fields[4])
        classes.append(DeviceClass(name=name, count=count, stages=stages, speed=speed, memory_gb=memory_gb))
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
