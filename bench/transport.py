"""Tensor handoff cost per transport, against plain memory copies measured in the same run.

    PYTHONPATH=. python bench/transport.py [--quick]

For each size (64 KiB to 64 MiB, powers of 4) and transport (inline up to NATS's default
1 MiB message limit, shm, redis, and cuda_ipc when CUDA is present, there within one process,
so it times handle creation and the lease registry, not the peer mapping), times one handoff as
``Transports.put`` + ``get`` + ``delete`` of a float32 tensor (redis and inline checksum the
bytes at both ends; shm does not, see disagfusion/transport/shm.py) and reports GB/s = bytes /
median seconds. shm is timed on two paths (``path`` in the rows):

- ``copy``: a tensor in the producer's own memory (what a diffusers stage returns), copied
  once into a warm slot by ``put``;
- ``zero_copy``: an output the producer wrote straight into ``Transports.empty``'s slot; the
  handoff is ``empty`` + ``put`` + ``get`` + ``delete`` and moves no byte (the producer's write is
  its compute, which it does wherever the output lives; the consumer reads the same pages).

Baselines, timed in turn with the handoff in every repeat, at the same size: ``memcpy`` (numpy
copyto into a warm, preallocated buffer: the best any copy can do) and ``alloc_copy`` (torch
clone: a copy into freshly allocated memory). ratio = memcpy seconds / handoff seconds, so
ratio >= 1 means the handoff costs no more than one memcpy of its bytes. Also breaks one 4 MiB
shm handoff of each path into its parts. Starts its own redis-server on a free 127.0.0.1 port
and stops it. Prints a table, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from disagfusion.config import Settings
from disagfusion.launcher import binary, free_port, stop_process, wait_port
from disagfusion.machine import describe
from disagfusion.transport import Transports
from disagfusion.transport.ref import checksum, tensor_bytes

KIB = 1024
SIZES = [64 * KIB * 4**k for k in range(6)]  # 64 KiB ... 64 MiB
NATS_MAX_PAYLOAD = 1024 * KIB
"""nats-server's default max_payload: inline tensors cannot be larger."""
GOAL_BYTES = BREAKDOWN_BYTES = 4 * KIB * KIB
"""The goal (a handoff costs at most one memcpy) is judged from here up."""


def load() -> str:
    """The 1-, 5- and 15-minute load averages, as ``uptime`` prints them."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def interleaved_medians(actions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each action, taking turns within every repeat, so load from other
    processes on a shared machine falls on all of them alike and their ratios stay fair."""
    for action in actions.values():
        action()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            started = time.perf_counter()
            action()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    port = free_port()
    command = [binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(directory)]
    with open(directory / "redis.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_port(port, proc, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc)


def copy_baselines(tensor: torch.Tensor) -> dict[str, Callable[[], object]]:
    src = tensor_bytes(tensor)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the destination in once: memcpy is the warm best case
    return {"memcpy": lambda: np.copyto(dst, src), "alloc_copy": tensor.clone}


def shm_breakdown(transports: Transports, tensor: torch.Tensor, repeats: int) -> dict[str, float]:
    """Seconds of each part of one shm handoff on each path, and of what a byte hash would add."""
    raw = tensor_bytes(tensor)
    parts = interleaved_medians({"checksum_not_done": lambda: checksum(raw)}, repeats)
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for path in ("copy", "zero_copy"):
            t0 = time.perf_counter()
            payload = transports.empty(tensor.shape, tensor.dtype) if path == "zero_copy" else tensor
            t1 = time.perf_counter()
            ref = transports.put("bench.breakdown", payload)
            t2 = time.perf_counter()
            transports.get(ref)
            t3 = time.perf_counter()
            transports.delete(ref)
            t4 = time.perf_counter()
            del payload
            for part, seconds in (("empty", t1 - t0), ("put", t2 - t1), ("get", t3 - t2), ("delete", t4 - t3)):
                if path == "copy" and part == "empty":
                    continue
                times.setdefault(f"{path}.{part}", []).append(seconds)
    parts |= {name: statistics.median(values) for name, values in times.items()}
    return {name: round(seconds, 6) for name, seconds in parts.items()}


def zero_copy_handoff(transports: Transports, tensor: torch.Tensor, key: str) -> Callable[[], None]:
    """One zero-copy handoff of ``tensor``'s bytes. They are written into the slot once, here:
    the handoffs reuse that slot, whose pages keep them, and the first is checked bit for bit."""
    out = transports.empty(tensor.shape, tensor.dtype)
    out.copy_(tensor)
    ref = transports.put(key, out)
    assert ref.transport == "shm" and torch.equal(transports.get(ref), tensor)
    transports.delete(ref)
    del out

    def handoff() -> None:
        ref = transports.put(key, transports.empty(tensor.shape, tensor.dtype))
        transports.get(ref)
        transports.delete(ref)

    return handoff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (finishes well under 2 minutes)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 9)
    command = "PYTHONPATH=. python bench/transport.py " + " ".join(sys.argv[1:])
    torch.set_num_threads(1)  # the copies being compared are single-threaded; so is torch's clone here
    info = describe()
    print(f"# machine: {info}\n# reproduce: {command}\n# repeats per point: {repeats} (median)")

    scratch = Path(tempfile.mkdtemp(prefix="df-bench-transport-"))
    shm_dir = Path(tempfile.mkdtemp(prefix="df-bench-transport-", dir="/dev/shm"))
    rows: list[dict[str, object]] = []
    breakdown: dict[str, float] = {}
    try:
        with redis_server(scratch) as redis_url:
            names = ["inline", "shm", "shm zero_copy", "redis"] + (["cuda_ipc"] if torch.cuda.is_available() else [])
            print(f"{'transport':>14s} {'bytes':>10s} {'seconds':>10s} {'GB/s':>8s} {'memcpy':>8s} {'alloc+cp':>8s} {'ratio':>6s}")
            for size in SIZES:
                tensor = torch.randn(size // 4, generator=torch.Generator().manual_seed(size))
                for label in names:
                    name, _, path = label.partition(" ")
                    if name == "inline" and size > NATS_MAX_PAYLOAD:
                        continue
                    settings = Settings(
                        transport="shm" if name == "inline" else name,
                        inline_max_bytes=size + 1 if name == "inline" else 0,
                        shm_dir=shm_dir, redis_url=redis_url,
                    )
                    transports = Transports(settings)
                    payload = tensor.cuda() if name == "cuda_ipc" else tensor

                    def handoff() -> None:
                        ref = transports.put(f"bench.{name}.{size}", payload)
                        assert ref.transport == name, ref.transport
                        transports.get(ref)
                        transports.delete(ref)

                    if path == "zero_copy":
                        handoff = zero_copy_handoff(transports, tensor, f"bench.{name}.{size}")
                    medians = interleaved_medians({"handoff": handoff, **copy_baselines(tensor)}, repeats)
                    seconds, memcpy, alloc_copy = medians["handoff"], medians["memcpy"], medians["alloc_copy"]
                    if label == "shm" and size == BREAKDOWN_BYTES:
                        breakdown = shm_breakdown(transports, tensor, repeats)
                    transports.close()
                    row = dict(transport=name, path=path or "copy", bytes=size, seconds=round(seconds, 9),
                               gbps=round(size / seconds / 1e9, 3), memcpy_seconds=round(memcpy, 9),
                               memcpy_gbps=round(size / memcpy / 1e9, 3), alloc_copy_gbps=round(size / alloc_copy / 1e9, 3),
                               ratio_to_memcpy=round(memcpy / seconds, 3), ratio_to_alloc_copy=round(alloc_copy / seconds, 3))
                    rows.append(row)
                    print(f"{label:>14s} {size:>10d} {seconds:>10.6f} {row['gbps']:>8.3f} {row['memcpy_gbps']:>8.3f} "
                          f"{row['alloc_copy_gbps']:>8.3f} {row['ratio_to_memcpy']:>6.3f}")
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    summary: dict[str, object] = {}
    for path in ("zero_copy", "copy"):
        large = [r for r in rows if r["transport"] == "shm" and r["path"] == path and r["bytes"] >= GOAL_BYTES]
        summary[f"shm_{path}_min_ratio_to_memcpy_at_4MiB_plus"] = min(r["ratio_to_memcpy"] for r in large)
        summary[f"shm_{path}_min_ratio_to_alloc_copy_at_4MiB_plus"] = min(r["ratio_to_alloc_copy"] for r in large)
    summary["goal_shm_zero_copy_handoff_at_most_one_memcpy_at_4MiB_plus"] = (
        summary["shm_zero_copy_min_ratio_to_memcpy_at_4MiB_plus"] >= 1.0
    )
    print(f"# shm handoff of {BREAKDOWN_BYTES} bytes, median seconds per part: {breakdown}")
    print(f"# ratio = memcpy seconds / handoff seconds, same run; >= 1.0 means the handoff costs at most one memcpy")
    for path in ("zero_copy", "copy"):
        print(f"# shm {path:>9s} from 4 MiB up: min ratio to memcpy {summary[f'shm_{path}_min_ratio_to_memcpy_at_4MiB_plus']}")
    print(f"# goal (zero_copy ratio >= 1.0 from 4 MiB up): "
          f"{'met' if summary['goal_shm_zero_copy_handoff_at_most_one_memcpy_at_4MiB_plus'] else 'NOT met'}; load at the end {load()}")
    print(json.dumps({"bench": "transport", "quick": args.quick, "repeats": repeats, "machine": info,
                      "command": command, "load_at_end": load(), "summary": summary, "shm_breakdown_4MiB": breakdown, "rows": rows}))


if __name__ == "__main__":
    main()
