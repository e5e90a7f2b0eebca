"""A three-node NATS JetStream cluster with every stream kept on three nodes (DF_STREAM_REPLICAS=3):
the stage services and the client take the nodes as one comma-separated DF_NATS_URL, and killing
the node that leads the work stream mid-run loses no job and answers none twice."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from disagfusion.bus import wait_out_unavailable
from disagfusion.client import Client
from disagfusion.config import Settings
from disagfusion.launcher import stop_process
from disagfusion.protocol import RESULTS_STREAM, WORK_STREAM, JobSpec, results_subject

JOBS = 24


@pytest.fixture
def stages(nats_cluster, tmp_path: Path, tiny_models_dir: Path) -> Iterator[None]:
    """An encoder, a dit and a decoder serving the emulated model, each connected to every node."""
    env = {**os.environ, "DF_NATS_URL": nats_cluster.url, "DF_STREAM_REPLICAS": "3", "DF_MODELS": "emulated",
           "DF_MODELS_DIR": str(tiny_models_dir), "DF_SHM_DIR": str(tmp_path / "shm"), "DF_ACK_WAIT_S": "5",
           "PYTHONUNBUFFERED": "1"}
    processes = []
    for service in ("encoder", "dit", "decoder"):
        with open(tmp_path / f"{service}.log", "wb") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", f"services.{service}"], stdout=log, stderr=subprocess.STDOUT,
                env={**env, "DF_HEALTH_FILE": str(tmp_path / f"{service}.health")}))
    try:
        yield
    finally:
        for process in processes:
            stop_process(process)


@pytest.mark.slow
async def test_killing_the_work_streams_leader_loses_no_job(nats_cluster, stages) -> None:
    settings = Settings(nats_url=nats_cluster.url, stream_replicas=3)
    specs = [JobSpec(model="emulated", prompt=f"job {i}", seed=i, steps=2, width=64, height=64, guidance=1.0)
             for i in range(JOBS)]
    async with Client(settings) as client:
        work = await client._js.stream_info(WORK_STREAM)
        assert work.config.num_replicas == 3 and len(work.cluster.replicas) == 2
        for spec in specs:
            await client.submit(spec)
        for spec in specs[:3]:
            assert (await client.result(spec.job_id, timeout=120)).status == "ok"
        leader = (await client._js.stream_info(WORK_STREAM)).cluster.leader
    killed_at = time.monotonic()
    nats_cluster.kill(leader)
    survivors = [url for url, name in zip(nats_cluster.urls, nats_cluster.nodes) if name != leader]
    async with Client(Settings(nats_url=",".join(survivors), stream_replicas=3)) as client:
        results = [await client.result(spec.job_id, timeout=120) for spec in specs]
        print(f"{JOBS} results {time.monotonic() - killed_at:.1f} s after killing the work stream's leader {leader}")
        assert all(result.status == "ok" for result in results), [r.error for r in results if r.status != "ok"]
        stored = await wait_out_unavailable(
            lambda: client._js.stream_info(RESULTS_STREAM, subjects_filter="df.results.>"))
        counts = stored.state.subjects or {}
        assert [counts.get(results_subject(spec.job_id), 0) for spec in specs] == [1] * JOBS  # exactly once
        assert (await wait_out_unavailable(lambda: client._js.stream_info(WORK_STREAM))).cluster.leader != leader
