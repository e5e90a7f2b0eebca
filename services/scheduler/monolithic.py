"""The monolithic baseline in simulation: every device runs whole jobs, all three stages in one
process, one job at a time (one diffusers pipeline per device, the deployment disaggregation is
measured against), jobs taken first come first served by the device free first.

A device must hold every stage's weights and working memory at once. Where they do not fit,
it offloads, as pipelines on small GPUs do, at a cost from published figures:

- the DiT stays resident if it fits, then the VAE, then the text encoder (the DiT runs longest);
- an offloaded encoder or VAE is moved to the device for every job, at ``transfer_gbps``: the
  rate LightX2V's disaggregation blog implies for Wan2.1's umt5-xxl text encoder (9.4 GB bf16)
  on an RTX 4090, 12.89 s per job with offload against 0.40 s resident
  (https://light-ai.top/LightX2V-BLOG/posts/Disaggregation/, "32.2x Text Encoder speedup");
- an offloaded DiT streams its blocks every step, either overlapped with compute (LightX2V's
  block offload: the same blog's "up to 1.54x DiT per-step speedup" once offload is gone, so
  ``dit_slowdown`` 1.54, a lower bound on the cost) or, with ``dit_streamed``, not overlapped
  (diffusers' sequential CPU offload: the DiT's weights moved at ``transfer_gbps`` every step,
  twice when guided)."""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from disagfusion.memory import GB, StageMemory
from disagfusion.protocol import STAGES, JobSpec
from services.scheduler.pool import DeviceClass, Pool
from services.scheduler.predictor import Predictor
from services.scheduler.simulation import JobRecord
from services.scheduler.trace import TraceEntry

RESIDENT_FIRST = ("denoise", "decode", "encode")
"""The order a monolithic pipeline keeps its stages on the device while memory lasts."""


class Offload(BaseModel):
    """What offloading costs a monolithic pipeline (see the module docstring for the sources)."""

    transfer_gbps: float = 9.4 / (12.89 - 0.40)
    """GB moved to the device per second by offload: 9.4 GB in the 12.49 s offload added."""
    dit_slowdown: float = 1.54
    dit_streamed: bool = False


def offloaded(device: DeviceClass, needs: Mapping[str, StageMemory]) -> tuple[str, ...]:
    """The stages a monolithic pipeline on ``device`` cannot keep resident."""
    if device.memory_gb is None:
        return ()
    free = device.memory_gb * GB
    out = []
    for stage in RESIDENT_FIRST:
        need = needs[stage].total_bytes if stage in needs else 0
        if need <= free:
            free -= need
        else:
            out.append(stage)
    return tuple(stage for stage in STAGES if stage in out)


@dataclass(frozen=True)
class MonolithicDevice:
    device: DeviceClass
    offloaded: tuple[str, ...]

    def seconds(self, spec: JobSpec, truth: Predictor, needs: Mapping[str, StageMemory], offload: Offload) -> float:
        return sum(self.stage_seconds(spec, truth, needs, offload).values())

    def stage_seconds(self, spec: JobSpec, truth: Predictor, needs: Mapping[str, StageMemory],
                      offload: Offload) -> dict[str, float]:
        """Each stage's seconds of ``spec`` on this device, offload included (bench/fleet.py's
        live run writes them into the emulated model its pipelines run)."""
        seconds = {}
        for stage, cost in zip(STAGES, truth.job_costs(spec)):
            compute = cost / self.device.speed
            if stage not in self.offloaded:
                seconds[stage] = compute
                continue
            moved_s = (needs[stage].weight_bytes / GB) / offload.transfer_gbps
            if stage != "denoise":
                seconds[stage] = compute + moved_s
            elif offload.dit_streamed:
                seconds[stage] = compute + moved_s * spec.steps * (2 if spec.guided else 1)
            else:
                seconds[stage] = compute * offload.dit_slowdown
        return seconds


def monolithic_devices(pool: Pool, needs: Mapping[str, StageMemory]) -> list[MonolithicDevice]:
    """One entry per device that can run a whole pipeline (a class restricted to some stages
    cannot), fastest first."""
    devices = [MonolithicDevice(c, offloaded(c, needs)) for c in pool.classes if set(STAGES) <= set(c.stages)
               for _ in range(c.count)]
    if not devices:
        raise ValueError("no device class of the pool may host all three stages: a monolithic pipeline cannot run")
    return sorted(devices, key=lambda d: -d.device.speed)


def simulate_monolithic(
    trace: Sequence[TraceEntry],
    pool: Pool,
    truth: Predictor,
    needs: Mapping[str, StageMemory],
    offload: Offload | None = None,
) -> list[JobRecord]:
    """Every job of ``trace`` through the monolithic fleet; the records carry completion times."""
    offload = offload or Offload()
    devices = monolithic_devices(pool, needs)
    free_at = [(0.0, k) for k in range(len(devices))]  # (time free, index: lower is faster)
    records = []
    for entry in sorted(trace, key=lambda e: e.t):
        idle = []
        while free_at and free_at[0][0] <= entry.t:
            idle.append(heapq.heappop(free_at))
        if idle:  # the fastest idle device takes it
            chosen = min(idle, key=lambda item: item[1])
            for item in idle:
                if item is not chosen:
                    heapq.heappush(free_at, item)
        else:  # all busy: the job waits for the first to finish
            chosen = heapq.heappop(free_at)
        free, k = chosen
        start = max(free, entry.t)
        done = start + devices[k].seconds(entry.spec, truth, needs, offload)
        heapq.heappush(free_at, (done, k))
        records.append(JobRecord(spec=entry.spec, arrived=entry.t, phase=entry.phase, done=done))
    return records
