"""Handoff cost per hop, by where producer and consumer run: the same shm domain (shm), another
domain with the producer pushing to Redis (redis), or another domain pulling from the
producer's over NATS request/reply (pull); ratios to the shm hop and to memcpy, same run.

    PYTHONPATH=. python bench/handoff.py [--quick]

One hop is what a stage pair does per tensor: the producer's ``Transports.put`` with the next
stage's destination (so the locality rules pick the transport: disagfusion/transport/locality.py),
the consumer's ``get`` and, once done, its ``delete`` (for pull, a request that frees the tensor
in the producer's domain). Producer and consumers are ``Transports`` of their own, each with its
own NATS connection serving ``Locality.serve`` on its own event loop, in this one process (so on
the same cores: the ratios say what a hop costs in CPU and round trips, not a network's
bandwidth); "another domain" is another shm directory. Starts nats-server and redis-server on
free 127.0.0.1 ports and stops them. Sizes are float32 tensors; the medians of interleaved
repeats (load from other processes falls on every way alike). Prints a table, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import nats
import torch

from bench.transport import copy_baselines, interleaved_medians, load, redis_server
from disagfusion.config import Settings
from disagfusion.launcher import binary, free_port, stop_process, wait_port
from disagfusion.machine import describe
from disagfusion.transport import Transports

KIB = 1024
SIZES = [256 * KIB, 1024 * KIB, 4096 * KIB, 16384 * KIB, 65536 * KIB]
QUICK_SIZES = [256 * KIB, 4096 * KIB]
MODEL = "bench"
WAYS: dict[str, tuple[str, tuple[str, str] | None]] = {
    "shm": ("decode", ("decode", MODEL)),  # consumer in the producer's domain
    "redis": ("denoise", ("denoise", MODEL)),  # consumer elsewhere, known to the producer
    "pull": ("denoise", None),  # consumer elsewhere, unknown when the producer stored it
}
"""Way -> (the consumer's stage, the destination the producer names)."""


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


@contextmanager
def nats_server(directory: Path) -> Iterator[str]:
    port = free_port()
    with open(directory / "nats.log", "wb") as log:
        proc = subprocess.Popen([binary("nats-server"), "-a", "127.0.0.1", "-p", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_port(port, proc, "nats-server")
        yield f"nats://127.0.0.1:{port}"
    finally:
        stop_process(proc)


class Side:
    """One worker's transports, serving its locality on an event loop of its own."""

    def __init__(self, settings: Settings, name: str, stage: str):
        self.transports = Transports(settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.nc = self._call(nats.connect(settings.nats_url))
        self.serving = asyncio.run_coroutine_threadsafe(
            self.transports.locality.serve(self.nc, name, stage, [MODEL]), self.loop)

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.serving.cancel)
        try:
            self.serving.result(timeout=10)
        except BaseException:
            pass  # cancelled, as asked
        self._call(self.nc.drain())
        self.transports.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def hop(producer: Transports, consumer: Transports, tensor: torch.Tensor, way: str) -> Callable[[], None]:
    _, bound_for = WAYS[way]
    expected = "redis" if way == "redis" else "shm"

    def run() -> None:
        ref = producer.put(f"bench.{way}.{tensor.numel()}", tensor, bound_for=bound_for)
        assert ref.transport == expected, (way, ref.transport)
        consumer.get(ref)
        consumer.delete(ref)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, three repeats (well under a minute)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 9)
    sizes = QUICK_SIZES if args.quick else SIZES
    command = "PYTHONPATH=. python bench/handoff.py " + " ".join(sys.argv[1:])
    torch.set_num_threads(1)
    info = describe()
    print(f"# machine: {info}\n# reproduce: {command}\n# uptime at start: {uptime()}\n# repeats per point: {repeats} (median)")

    scratch = Path(tempfile.mkdtemp(prefix="df-bench-handoff-"))
    domain_a = Path(tempfile.mkdtemp(prefix="df-bench-handoff-a-", dir="/dev/shm"))
    domain_b = Path(tempfile.mkdtemp(prefix="df-bench-handoff-b-", dir="/dev/shm"))
    rows: list[dict[str, object]] = []
    try:
        with nats_server(scratch) as nats_url, redis_server(scratch) as redis_url:
            common = dict(nats_url=nats_url, redis_url=redis_url, inline_max_bytes=0)
            producer = Side(Settings(shm_dir=domain_a, **common), "bench-producer", "encode")
            consumers = {
                "shm": Side(Settings(shm_dir=domain_a, **common), "bench-local", WAYS["shm"][0]),
                "elsewhere": Side(Settings(shm_dir=domain_b, **common), "bench-remote", WAYS["redis"][0]),
            }
            try:
                deadline = time.monotonic() + 10
                while producer.transports.locality.consumer_domains("denoise", MODEL) != {
                        consumers["elsewhere"].transports.locality.domain}:
                    assert time.monotonic() < deadline, "the consumers' domain ads did not arrive"
                    time.sleep(0.05)
                print(f"{'way':>6s} {'bytes':>10s} {'seconds':>10s} {'GB/s':>8s} {'x shm':>7s} {'memcpy GB/s':>11s}")
                for size in sizes:
                    tensor = torch.randn(size // 4, generator=torch.Generator().manual_seed(size))
                    actions = {way: hop(producer.transports, (consumers["shm"] if way == "shm" else consumers["elsewhere"])
                                        .transports, tensor, way) for way in WAYS}
                    medians = interleaved_medians({**actions, **copy_baselines(tensor)}, repeats)
                    for way in WAYS:
                        seconds = medians[way]
                        row = dict(way=way, bytes=size, seconds=round(seconds, 9), gbps=round(size / seconds / 1e9, 3),
                                   cost_vs_shm=round(seconds / medians["shm"], 2),
                                   memcpy_gbps=round(size / medians["memcpy"] / 1e9, 3))
                        rows.append(row)
                        print(f"{way:>6s} {size:>10d} {seconds:>10.6f} {row['gbps']:>8.3f} {row['cost_vs_shm']:>7.2f} "
                              f"{row['memcpy_gbps']:>11.3f}")
            finally:
                for side in (producer, *consumers.values()):
                    side.close()
    finally:
        for directory in (domain_a, domain_b, scratch):
            shutil.rmtree(directory, ignore_errors=True)
    print(f"# x shm = hop seconds / shm hop seconds at that size, same run; uptime at the end: {uptime()}")
    print(json.dumps({"bench": "handoff", "quick": args.quick, "repeats": repeats, "machine": info, "command": command,
                      "load_at_end": load(), "rows": rows}))


if __name__ == "__main__":
    main()
