"""disagfusion.metrics: names that follow Prometheus conventions, an endpoint per process that
replicas on one host never fight over, and the handoff counters the transport router feeds."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import services.gateway.metrics  # noqa: F401 - registers the gateway's metrics, checked here too
from disagfusion import metrics
from disagfusion.config import MetricsSettings, Settings
from disagfusion.launcher import free_port
from disagfusion.transport import Transports

UNITLESS = {"disagfusion_batch_size"}
"""A histogram of a count has no unit to end its name with."""
UNITS = ("_seconds", "_bytes", "_tasks", "_instances", "_rows")


def ours() -> list:
    return [f for f in text_string_to_metric_families(generate_latest(REGISTRY).decode()) if f.name.startswith("disagfusion_")]


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_every_metric_follows_the_naming_conventions() -> None:
    families = ours()
    assert len(families) >= 20
    for family in families:
        assert re.fullmatch(r"disagfusion_[a-z][a-z_]*[a-z]", family.name), family.name
        assert not family.name.endswith("_total"), f"{family.name}: the client adds _total to counters"
        if family.type == "histogram" and family.name not in UNITLESS:
            assert family.name.endswith(UNITS), f"{family.name}: a histogram's name ends with its unit"
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name in (f"{family.name}_total", f"{family.name}_created"), sample.name
            assert not {"job_id", "job", "prompt"} & set(sample.labels), f"{sample.name}: unbounded label"
        assert family.documentation, f"{family.name} has no help text"


@pytest.fixture
def servers() -> Iterator[list]:
    started: list = []
    yield started
    for server in started:
        server.shutdown()
        server.server_close()


def test_replicas_on_one_host_each_take_the_next_free_port(servers: list) -> None:
    assert metrics.serve(MetricsSettings(metrics_port=0), "dit") is None  # off
    base = free_port()
    settings = MetricsSettings(metrics_port=base, metrics_port_span=20)
    servers += [metrics.serve(settings, "dit"), metrics.serve(settings, "dit")]
    ports = [server.server_port for server in servers]
    assert ports[0] == base and base < ports[1] < base + 20
    metrics.job_left("denoise", "tiny", "done")
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            families = {f.name: f for f in text_string_to_metric_families(answer.read().decode())}
        assert any(s.labels == {"stage": "denoise", "model": "tiny", "status": "done"} and s.value >= 1
                   for s in families["disagfusion_jobs"].samples)


def test_a_full_span_leaves_the_service_without_metrics_rather_than_down(servers: list) -> None:
    settings = MetricsSettings(metrics_port=free_port(), metrics_port_span=1)
    servers.append(metrics.serve(settings, "dit"))
    assert metrics.serve(settings, "dit") is None


@pytest.mark.parametrize("inline_max_bytes, transport", [(1 << 20, "inline"), (0, "shm")])
def test_the_router_counts_handoff_bytes_and_seconds_per_transport(tmp_path: Path, inline_max_bytes: int,
                                                                   transport: str) -> None:
    transports = Transports(Settings(inline_max_bytes=inline_max_bytes, shm_dir=tmp_path))
    tensor = torch.ones(16, 32)
    before = {d: (value("disagfusion_handoff_bytes_total", transport=transport, direction=d),
                  value("disagfusion_handoff_seconds_count", transport=transport, direction=d)) for d in ("put", "get")}
    try:
        transports.get(transports.put("job.metrics.x", tensor))
    finally:
        transports.close()
    for direction in ("put", "get"):
        nbytes, count = before[direction]
        assert value("disagfusion_handoff_bytes_total", transport=transport, direction=direction) == nbytes + 16 * 32 * 4
        assert value("disagfusion_handoff_seconds_count", transport=transport, direction=direction) == count + 1
