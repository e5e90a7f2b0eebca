"""Tensor handoff cost per transport, against plain memory copies measured in the same run.

    PYTHONPATH=. python bench/transport.py [--quick]

For each size (64 KiB to 64 MiB, powers of 4) and transport (inline up to NATS's default
1 MiB message limit, shm, redis, and cuda_ipc when CUDA is present, there within one process,
so it times handle creation and the lease registry, not the peer mapping), times one handoff as
``Transports.put`` + ``get`` + ``delete`` of a float32 tensor (the consumer's checksum check
reads every byte) and reports GB/s = bytes / median seconds. Baselines, timed in turn with
the handoff in every repeat, at the same size: ``memcpy`` (numpy copyto into a warm,
preallocated buffer: the best any copy can do) and ``alloc_copy`` (torch clone: a copy into
freshly allocated memory, which a handoff between processes cannot avoid). Also breaks one shm handoff into its parts, to show
where the time goes. Starts its own redis-server on a free 127.0.0.1 port and stops it.
Prints a table, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
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
    """Seconds of each part of one shm handoff (the parts the put/get/delete calls are made of)."""
    raw = tensor_bytes(tensor)
    parts = interleaved_medians({"checksum": lambda: checksum(raw)}, repeats)
    times: dict[str, list[float]] = {"put": [], "get": [], "delete": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        ref = transports.put("bench.breakdown", tensor)
        t1 = time.perf_counter()
        transports.get(ref)
        t2 = time.perf_counter()
        transports.delete(ref)
        t3 = time.perf_counter()
        times["put"].append(t1 - t0)
        times["get"].append(t2 - t1)
        times["delete"].append(t3 - t2)
    parts |= {name: statistics.median(values) for name, values in times.items()}
    parts["put_without_checksum"] = parts["put"] - parts["checksum"]
    parts["get_without_checksum"] = parts["get"] - parts["checksum"]
    return {name: round(seconds, 6) for name, seconds in parts.items()}


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
            names = ["inline", "shm", "redis"] + (["cuda_ipc"] if torch.cuda.is_available() else [])
            print(f"{'transport':>9s} {'bytes':>10s} {'seconds':>10s} {'GB/s':>8s} {'memcpy':>8s} {'alloc+cp':>8s} {'ratio':>6s}")
            for size in SIZES:
                tensor = torch.randn(size // 4, generator=torch.Generator().manual_seed(size))
                for name in names:
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

                    medians = interleaved_medians({"handoff": handoff, **copy_baselines(tensor)}, repeats)
                    seconds, memcpy, alloc_copy = medians["handoff"], medians["memcpy"], medians["alloc_copy"]
                    if name == "shm" and size == SIZES[-1]:
                        breakdown = shm_breakdown(transports, tensor, repeats)
                    transports.close()
                    row = dict(transport=name, bytes=size, seconds=round(seconds, 9), gbps=round(size / seconds / 1e9, 3),
                               memcpy_gbps=round(size / memcpy / 1e9, 3), alloc_copy_gbps=round(size / alloc_copy / 1e9, 3),
                               ratio_to_memcpy=round(memcpy / seconds, 3), ratio_to_alloc_copy=round(alloc_copy / seconds, 3))
                    rows.append(row)
                    print(f"{name:>9s} {size:>10d} {seconds:>10.6f} {row['gbps']:>8.3f} {row['memcpy_gbps']:>8.3f} "
                          f"{row['alloc_copy_gbps']:>8.3f} {row['ratio_to_memcpy']:>6.3f}")
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    large_shm = [r for r in rows if r["transport"] == "shm" and r["bytes"] >= 4 * KIB * KIB]
    summary = {
        "shm_min_ratio_to_memcpy_at_4MiB_plus": min(r["ratio_to_memcpy"] for r in large_shm),
        "shm_min_ratio_to_alloc_copy_at_4MiB_plus": min(r["ratio_to_alloc_copy"] for r in large_shm),
    }
    print(f"# shm handoff of {SIZES[-1]} bytes, seconds per part: {breakdown}")
    print(f"# {summary}")
    print(json.dumps({"bench": "transport", "quick": args.quick, "repeats": repeats, "machine": info,
                      "command": command, "summary": summary, "shm_breakdown_64MiB": breakdown, "rows": rows}))


if __name__ == "__main__":
    main()
