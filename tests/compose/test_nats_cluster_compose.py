"""The stack on a three-node NATS cluster in containers (deploy/compose.nats-cluster.yaml, on
loopback ports with deploy/compose.nats-cluster.hostnet.yaml): the node leading the work stream
is killed mid-run, and every job still gets exactly one result."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable

import pytest

from compose_support import ROOT, Batch, ComposeStack, specs_for
from disagfusion.bus import wait_out_unavailable
from disagfusion.client import Client
from disagfusion.config import Settings
from disagfusion.launcher import free_port
from disagfusion.protocol import WORK_STREAM

pytestmark = pytest.mark.timeout(900)

CLUSTER = (ROOT / "deploy" / "compose.nats-cluster.yaml", ROOT / "deploy" / "compose.nats-cluster.hostnet.yaml")
NODES = {"nats-1": "nats", "nats-2": "nats-2", "nats-3": "nats-3"}
"""Server name -> compose service."""


def work_stream_leader(monitor_url: str) -> str:
    """The server name of the node leading DF_WORK, from a node's /jsz."""
    with urllib.request.urlopen(f"{monitor_url}/jsz?streams=true&config=true", timeout=5) as answer:
        accounts = json.load(answer)["account_details"]
    [stream] = [s for a in accounts for s in a.get("stream_detail", []) if s["name"] == WORK_STREAM]
    assert stream["config"]["num_replicas"] == 3
    return stream["cluster"]["leader"]


def test_killing_the_work_streams_leader_node_loses_no_job(
    compose_stack: Callable[..., ComposeStack], project_image: str
) -> None:
    ports = {name: free_port() for name in ("DF_NATS_CLUSTER_PORT", "DF_NATS_2_PORT", "DF_NATS_2_MONITOR_PORT",
                                            "DF_NATS_2_CLUSTER_PORT", "DF_NATS_3_PORT", "DF_NATS_3_MONITOR_PORT",
                                            "DF_NATS_3_CLUSTER_PORT")}
    stack = compose_stack(services=["nats", "nats-2", "nats-3", "redis", "encoder", "dit", "decoder"],
                          env={"DF_MODELS": "tiny", "DF_ACK_WAIT_S": "10", **{k: str(v) for k, v in ports.items()}},
                          overrides=CLUSTER, wait_timeout=300)
    urls = [stack.nats_url, f"nats://127.0.0.1:{ports['DF_NATS_2_PORT']}", f"nats://127.0.0.1:{ports['DF_NATS_3_PORT']}"]
    monitors = [stack.nats_monitor_url, f"http://127.0.0.1:{ports['DF_NATS_2_MONITOR_PORT']}",
                f"http://127.0.0.1:{ports['DF_NATS_3_MONITOR_PORT']}"]
    killed: list[str] = []

    def kill_the_leader() -> None:
        leader = work_stream_leader(monitors[0])
        stack.docker.compose.kill(services=[NODES[leader]])
        killed.append(NODES[leader])

    batch = Batch(Settings(nats_url=",".join(urls), stream_replicas=3), specs_for("nats node killed", 16, steps=8))
    asyncio.run(batch.run(when_some_done=kill_the_leader, after=2))
    batch.assert_each_job_done_once()
    [service] = killed
    assert stack.running(service) == 0
    survivors = [url for url, s in zip(urls, NODES.values(), strict=True) if s != service]

    async def leader_now() -> str:
        async with Client(Settings(nats_url=",".join(survivors), stream_replicas=3)) as client:
            return (await wait_out_unavailable(lambda: client._js.stream_info(WORK_STREAM))).cluster.leader

    assert NODES[asyncio.run(leader_now())] != service  # the survivors elected another leader
