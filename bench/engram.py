"""Engram store benchmark: how fast rows come out of each place they can live.

Sources, all over the same table (one Engram layer's table, float32 rows of 64 values), fresh
random ids every call, batch sizes 1, 64, 4096 and 65536:
  dram   numpy.take from an in-process array (the limit)
  arena  EngramClient.local: the client's whole path over the read-only mapping of the arena
         (with uint32 ids, and with int64 ids, which pay for a sign check; dram gets the same)
  nats   EngramClient.remote through a real engram_store process and nats-server, replies
         written into a shared scratch mapping ("shm") or sent in 1 MiB chunks ("chunks")
  redis  one key per row, MGET: what a user would build instead (a row subset, said in the JSON)
Then the prefetch overlap: the stall left for the encoder after compute windows of 0.05, 0.5
and 5 ms during which the prefetch ran in the background.

    PYTHONPATH=$PWD python bench/engram.py            # 4 GiB table (needs ~9 GiB of memory)
    PYTHONPATH=$PWD python bench/engram.py --quick    # 64 MiB table, under 2 minutes
    PYTHONPATH=$PWD python bench/engram.py --arena-dir /mnt/huge   # arena on a tmpfs mounted huge=always

The arena lives in /dev/shm unless --arena-dir names another tmpfs/hugetlbfs directory; the
JSON says which mount options it had and how much of the arena mapping the kernel mapped with
2 MiB pages (from /proc/self/smaps), since that decides random-access speed over 4 GiB.

Ends with one JSON line. Every figure is measured; nothing is modelled. rows_per_s and gbps come
from the median call (rows_per_s_mean from the mean), since the machine may be shared; the
arena/dram goal is also given as the median ratio of consecutive dram and arena calls (paired),
which load from other processes moves least.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import redis
import torch
import typer

from disagfusion.engram.arena import Arena, HasherConfig
from disagfusion.engram.build import build, engram_specs, random_filler
from disagfusion.engram.client import EngramClient
from disagfusion.launcher import binary, free_port, stop_process, wait_port

MAPPING_HEADER = re.compile(r"[0-9a-f]+-[0-9a-f]+ ")

BATCHES = (1, 64, 4096, 65536)
WINDOWS_MS = (0.05, 0.5, 5.0)
DIM = 64
HEADS = 8
ID_DTYPE = np.uint32
"""Row ids as the sources get them: unsigned 32-bit ids are the local client's fast path (no
sign check); dram and arena are measured with int64 ids too."""


def hasher_config(rows_per_head: int) -> HasherConfig:
    # One Engram layer, 2- and 3-grams, 8 heads each: 16 heads of about rows_per_head rows.
    return HasherConfig(
        compressed_vocab_size=100_000,
        engram_vocab_size=[rows_per_head, rows_per_head],
        max_ngram_size=3,
        n_head_per_ngram=HEADS,
        layer_ids=[1],
        pad_id=0,
        seed=0,
    )


def mount_of(directory: Path) -> str:
    """The /proc/mounts line of the filesystem holding ``directory`` (its options show huge=)."""
    path = directory.resolve()
    mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if path.is_relative_to(line.split()[1])]
    return max(mounts, key=lambda line: len(line.split()[1]), default="")


def mapping_pages(path: str) -> dict[str, int]:
    """kB of this process's mappings of ``path``: mapped in all, and mapped with 2 MiB pages."""
    totals = {"rss_kb": 0, "pmd_mapped_kb": 0}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if MAPPING_HEADER.match(line):  # a new mapping begins; its path ends the line
            inside = line.endswith(path)
        elif inside and line.startswith("Rss:"):
            totals["rss_kb"] += int(line.split()[1])
        elif inside and line.startswith(("ShmemPmdMapped:", "FilePmdMapped:")):
            totals["pmd_mapped_kb"] += int(line.split()[1])
        elif inside and line.startswith(("Shared_Hugetlb:", "Private_Hugetlb:")):  # hugetlbfs: not in Rss
            totals["rss_kb"] += int(line.split()[1])
            totals["pmd_mapped_kb"] += int(line.split()[1])
    return totals


@contextmanager
def running(args: list[str], env: dict[str, str] | None = None, port: int | None = None, ready: str | None = None) -> Iterator[None]:
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE if ready else subprocess.DEVNULL, stderr=subprocess.STDOUT, text=True)
    try:
        if port is not None:
            wait_port(port, proc, args[0], timeout=30)
        if ready is not None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if ready in line:
                    break
            else:
                raise RuntimeError(f"{args} exited before it was ready")
        yield
    finally:
        stop_process(proc)


def measure(
    calls: dict[str, Callable[[np.ndarray], object]], batch: int, id_high: int, budget_s: float, rng: np.random.Generator,
    id_dtype: type[np.integer] = ID_DTYPE,
) -> dict[str, dict[str, float]]:
    """Latency of each call on fresh random ids, the calls taking turns so that load from other
    processes on this machine falls on all of them alike, until the budget is spent."""
    for call in calls.values():
        call(rng.integers(0, id_high, batch, dtype=id_dtype))  # first call: connections, scratch files
    times: dict[str, list[float]] = {name: [] for name in calls}
    spent = 0.0
    while (spent < budget_s * len(calls) and len(times[next(iter(calls))]) < 20_000) or len(times[next(iter(calls))]) < 5:
        for name, call in calls.items():
            ids = rng.integers(0, id_high, batch, dtype=id_dtype)
            t0 = time.perf_counter()
            call(ids)
            dt = time.perf_counter() - t0
            times[name].append(dt)
            spent += dt
    out = {}
    for name, samples in times.items():
        lat = np.array(samples)
        p50 = float(np.percentile(lat, 50))
        out[name] = {
            # From the median call: other agents' load on this shared machine puts long stalls
            # in the mean that have nothing to do with the source (the mean is kept too).
            "rows_per_s": batch / p50,
            "rows_per_s_mean": batch * len(lat) / lat.sum(),
            "p50_ms": p50 * 1e3,
            "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "calls": len(lat),
        }
    if len(calls) == 2:
        # Consecutive calls see the same load from other processes; the median of their
        # ratios is steadier on a busy machine than the ratio of two medians.
        first, second = (np.array(samples) for samples in times.values())
        out[next(iter(calls))]["paired_speed_of_next"] = float(np.median(first / second))
    return out


def compute_for(window_ms: float) -> None:
    """Encoder-like compute for window_ms: small torch matmuls (which release the GIL, as an
    encoder's kernels do) until the window has passed."""
    a = torch.ones(48, 48)
    deadline = time.perf_counter() + window_ms / 1e3
    while time.perf_counter() < deadline:
        a = torch.mm(a, a).clamp_(-1, 1)


def prefetch_overlap(client: EngramClient, source: str, rounds: int, rng: np.random.Generator) -> list[dict]:
    """Stall = time wait() still blocks after the compute window; ``fetch_ms`` = the same
    fetch with no compute to hide behind. 4 prompts of 77 tokens, 16 heads: 4928 rows."""
    out = []
    shape = (4, 77)
    fetch = []
    for _ in range(rounds):
        ids = rng.integers(0, 100_000, shape)
        t0 = time.perf_counter()
        client.wait(client.prefetch(ids, compressed=True))
        fetch.append(time.perf_counter() - t0)
    for window in WINDOWS_MS:
        stalls, computes = [], []
        for _ in range(rounds):
            ids = rng.integers(0, 100_000, shape)
            handle = client.prefetch(ids, compressed=True)
            t0 = time.perf_counter()
            compute_for(window)
            t1 = time.perf_counter()
            client.wait(handle)
            stalls.append(time.perf_counter() - t1)
            computes.append(t1 - t0)
        out.append(
            {
                "source": source,
                "window_ms": window,
                "compute_ms": float(np.median(computes) * 1e3),
                "fetch_ms": float(np.median(fetch) * 1e3),
                "stall_p50_ms": float(np.percentile(stalls, 50) * 1e3),
                "stall_p99_ms": float(np.percentile(stalls, 99) * 1e3),
            }
        )
    return out


def main(
    quick: bool = typer.Option(False, help="64 MiB table and short runs (under 2 minutes)"),
    rows_per_head: int = typer.Option(0, help="override the table size (rows per head; 16 heads)"),
    redis_rows: int = typer.Option(1_000_000, help="rows loaded into Redis (a prefix of the table)"),
    dram_huge_pages: bool = typer.Option(
        True, help="let numpy back the dram copy with transparent huge pages (its default); --no-dram-huge-pages "
        "gives it 4 KiB pages, like an arena on a tmpfs without shmem huge pages",
    ),
    arena_dir: Path = typer.Option(Path("/dev/shm"), help="where the arena file goes (a tmpfs or hugetlbfs directory)"),
) -> None:
    torch.set_num_threads(1)  # the encoder's compute and the prefetch thread share the cores
    rows_per_head = rows_per_head or (16_384 if quick else 1_048_576)
    budget_s = 0.25 if quick else 1.5
    rounds = 20 if quick else 100
    config = hasher_config(rows_per_head)
    specs, layout = engram_specs(config, dim=DIM, dtype="float32")
    table = specs[0]
    run_id = uuid.uuid4().hex[:8]
    arena_path = str(arena_dir / f"df-engram-bench-{run_id}.arena")
    scratch = str(arena_dir / f"df-engram-bench-{run_id}-scratch")
    nats_store = tempfile.mkdtemp(prefix="df-engram-bench-nats-")
    rng = np.random.default_rng(0)
    print(f"# Engram store bench on {platform.node()} ({os.cpu_count()} cpus, {platform.machine()}), python {platform.python_version()}")
    print(f"# table {table.name}: {table.rows} rows x {DIM} float32 = {table.nbytes / 2**30:.2f} GiB")
    thp = {name: Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text().strip() for name in ("enabled", "shmem_enabled")}
    print(f"# transparent huge pages: {thp}; dram copy {'may use' if dram_huge_pages else 'without'} huge pages")
    mount = mount_of(arena_dir)
    print(f"# arena directory {arena_dir}: {mount}")
    print(
        f"# reproduce: PYTHONPATH=$PWD python bench/engram.py{' --quick' if quick else ''}"
        f"{'' if dram_huge_pages else ' --no-dram-huge-pages'}"
        f"{'' if arena_dir == Path('/dev/shm') else f' --arena-dir {arena_dir}'}"
    )
    t0 = time.perf_counter()
    try:
        build(arena_path, specs, random_filler(specs, seed=0), layout)
        print(f"# built arena in {time.perf_counter() - t0:.1f} s")
        rows: list[dict] = []
        prefetch: list[dict] = []
        paired: dict[str, dict[str, float]] = {"uint32": {}, "int64": {}}
        """arena speed / dram speed, median over consecutive pairs of calls, per id type and batch."""

        def record(source: str, batch: int, figures: dict, **extra: object) -> None:
            row = {"source": source, "batch": batch, **extra, **figures, "gbps": figures["rows_per_s"] * table.row_bytes / 1e9}
            rows.append(row)
            print(
                f"{source:6} {str(extra.get('reply', extra.get('ids', ''))):6} batch {batch:6}: {row['rows_per_s']:>14,.0f} rows/s "
                f"{row['gbps']:7.3f} GB/s  p50 {row['p50_ms']:8.4f} ms  p99 {row['p99_ms']:8.4f} ms",
                flush=True,
            )

        # numpy madvises large arrays for transparent huge pages; a tmpfs arena gets them only
        # where /sys/kernel/mm/transparent_hugepage/shmem_enabled allows.
        np._core.multiarray._set_madvise_hugepage(dram_huge_pages)
        with Arena.open(arena_path) as arena:
            dram = np.array(arena.table(table.name))  # a private copy in this process's memory
        with EngramClient.local(arena_path) as local:
            local.lookup(table.name, np.arange(0, table.rows, 4096, dtype=np.uint32))  # map the pages before reading smaps
            arena_pages = mapping_pages(arena_path)
            print(f"# arena mapping: {arena_pages}")
            for batch in BATCHES:
                for id_dtype in (np.uint32, np.int64):
                    figures = measure(
                        {"dram": lambda ids: np.take(dram, ids, axis=0), "arena": lambda ids: local.lookup(table.name, ids)},
                        batch, table.rows, budget_s, rng, id_dtype,
                    )
                    ids = np.dtype(id_dtype).name
                    paired[ids][str(batch)] = figures["dram"].pop("paired_speed_of_next")
                    record("dram", batch, figures["dram"], ids=ids)
                    record("arena", batch, figures["arena"], ids=ids)
            del dram
            prefetch += prefetch_overlap(local, "arena", rounds, rng)

        nats_port, redis_port = free_port(), free_port()
        nats_url = f"nats://127.0.0.1:{nats_port}"
        env = {**os.environ, "DF_NATS_URL": nats_url, "DF_ENGRAM_SCRATCH_DIR": scratch, "PYTHONPATH": os.getcwd()}
        with (
            running([binary("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd", nats_store], port=nats_port),
            running([sys.executable, "-m", "services.engram_store", f"--arena={arena_path}"], env=env, ready="engram_store ready"),
        ):
            for reply in ("shm", "chunks"):
                with EngramClient.remote(nats_url, reply=reply) as remote:
                    for batch in BATCHES:
                        figures = measure({"nats": lambda ids: remote.lookup(table.name, ids)}, batch, table.rows, budget_s, rng)
                        record("nats", batch, figures["nats"], reply=reply)
                    prefetch += prefetch_overlap(remote, f"nats-{reply}", rounds, rng)

        loaded = min(redis_rows, table.rows)
        with running([binary("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], port=redis_port):
            r = redis.Redis(host="127.0.0.1", port=redis_port)
            with Arena.open(arena_path) as arena:
                view = arena.table(table.name)
                for start in range(0, loaded, 20_000):
                    stop = min(loaded, start + 20_000)
                    r.mset({f"r:{i}": view[i].tobytes() for i in range(start, stop)})
            del view

            def from_redis(ids: np.ndarray) -> np.ndarray:
                values = r.mget([f"r:{i}" for i in ids.tolist()])
                return np.frombuffer(b"".join(values), dtype=np.float32).reshape(len(ids), DIM)

            for batch in BATCHES:
                record("redis", batch, measure({"redis": from_redis}, batch, loaded, budget_s, rng)["redis"], table_rows=loaded)
            r.close()
    finally:
        Path(arena_path).unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(nats_store, ignore_errors=True)

    print("# prefetch overlap (4 prompts x 77 tokens x 16 heads = 4928 rows per prefetch)")
    for p in prefetch:
        print(
            f"{p['source']:12} window {p['window_ms']:5.2f} ms (measured {p['compute_ms']:6.3f}): "
            f"stall p50 {p['stall_p50_ms']:7.4f} ms  p99 {p['stall_p99_ms']:7.4f} ms  (fetch alone {p['fetch_ms']:.3f} ms)"
        )

    def of(source: str, batch: int, reply: str | None = None, ids: str | None = None) -> dict:
        return next(
            r for r in rows
            if r["source"] == source and r["batch"] == batch and r.get("reply") == reply and r.get("ids", ids) == ids
        )

    goals = {
        f"arena_vs_dram_{ids}_ids": {
            str(b): of("arena", b, ids=ids)["rows_per_s"] / of("dram", b, ids=ids)["rows_per_s"] for b in BATCHES
        }
        for ids in ("uint32", "int64")
    } | {f"arena_vs_dram_{ids}_ids_paired": ratios for ids, ratios in paired.items()} | {
        "nats_shm_slowdown_vs_dram_65536": of("dram", 65536, ids="uint32")["rows_per_s"] / of("nats", 65536, "shm")["rows_per_s"],
        "nats_chunks_slowdown_vs_dram_65536": of("dram", 65536, ids="uint32")["rows_per_s"] / of("nats", 65536, "chunks")["rows_per_s"],
        "nats_shm_vs_redis_65536": of("nats", 65536, "shm")["rows_per_s"] / of("redis", 65536)["rows_per_s"],
        "nats_chunks_vs_redis_65536": of("nats", 65536, "chunks")["rows_per_s"] / of("redis", 65536)["rows_per_s"],
    }
    print("# goals: arena/dram >= 0.9 at every batch; dram/nats <= 3 at 65536; nats/redis > 1")
    print("#", json.dumps(goals))
    summary = {
        "bench": "engram",
        "quick": quick,
        "dram_huge_pages": dram_huge_pages,
        "transparent_hugepage": thp,
        "arena_mount": mount,
        "arena_mapping": arena_pages,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "table_bytes": table.nbytes,
        "table_rows": table.rows,
        "row_bytes": table.row_bytes,
        "rows": rows,
        "prefetch": prefetch,
        "goals": goals,
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    typer.run(main)
