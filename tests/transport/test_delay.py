"""The handoff delay is for tests and benchmarks: the router ``open_transports`` makes when a
delay is set waits before each handoff, and the plain router never does, whatever the settings."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from disagfusion.config import Settings
from disagfusion.protocol import TensorRef
from disagfusion.transport import DelayedTransports, Transports, open_transports

DELAY_MS = 50.0


def seconds_to_get_all(transports: Transports, refs: dict[str, TensorRef]) -> float:
    started = time.perf_counter()
    transports.get_all(refs)
    return time.perf_counter() - started


def test_open_transports_delays_only_when_a_delay_is_set(tmp_path: Path) -> None:
    def opened(delay_ms: float, jitter_ms: float) -> type[Transports]:
        settings = Settings(shm_dir=tmp_path, handoff_delay_ms=delay_ms, handoff_jitter_ms=jitter_ms)
        return type(open_transports(settings))

    assert opened(0, 0) is Transports
    assert opened(DELAY_MS, 0) is DelayedTransports
    assert opened(0, DELAY_MS) is DelayedTransports


def test_only_the_delaying_router_waits_before_a_handoff(tmp_path: Path) -> None:
    settings = Settings(shm_dir=tmp_path, handoff_delay_ms=DELAY_MS, handoff_jitter_ms=0)
    delayed, plain = DelayedTransports(settings), Transports(settings)
    refs = {"embeds": plain.put("job.encode.embeds", torch.ones(4))}
    assert seconds_to_get_all(delayed, refs) >= DELAY_MS / 1000
    assert seconds_to_get_all(plain, refs) < DELAY_MS / 1000
    assert seconds_to_get_all(delayed, {}) < DELAY_MS / 1000  # no tensors: no handoff to delay
    delayed.close()
    plain.close()
