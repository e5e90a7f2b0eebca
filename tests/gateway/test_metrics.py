"""Every service's metrics endpoint, scraped over HTTP from a stack of real processes and parsed
with Prometheus's own text parser, moves as jobs run; the gateway's /metrics adds its requests
and the JetStream backlog per stage, and answers at once while NATS is away."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from disagfusion.launcher import Launcher, free_port
from disagfusion.protocol import STAGES
from disagfusion_cli import app
from tests.gateway.conftest import GatewayStarter

Samples = dict[tuple[str, frozenset], float]
"""A scrape: (sample name, its labels) → value."""


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    """A job's result reaches the client just before its last stage acks and counts it."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the metrics did not move in time"
        time.sleep(0.2)


def test_every_endpoint_parses_and_moves_as_jobs_run(gateway_stack: Launcher) -> None:
    state = gateway_stack.state()
    urls = state.metrics_urls
    assert {name: len(found) for name, found in urls.items()} == {"encoder": 1, "dit": 1, "decoder": 1, "gateway": 1}
    assert len({url for found in urls.values() for url in found}) == 4  # a port each
    endpoints = {name: found[0] for name, found in urls.items()}
    before = {name: scrape(url) for name, url in endpoints.items()}

    body = json.dumps({"model": "tiny", "prompt": "a fox", "size": "64x64", "n": 2, "num_inference_steps": 2})
    request = urllib.request.Request(f"{state.gateway_url}/v1/images/generations", data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        assert answer.status == 200 and len(json.load(answer)["data"]) == 2

    after: dict[str, Samples] = {}

    def moved(name: str, metric: str, by: float = 1, **labels: str) -> bool:
        return get(after[name], metric, **labels) - get(before[name], metric, **labels) >= by

    def stages_done() -> bool:
        after.update({name: scrape(url) for name, url in endpoints.items()})
        return all(moved(service, "disagfusion_jobs_total", 2, stage=stage, model="tiny", status="done")
                   for service, stage in zip(("encoder", "dit", "decoder"), STAGES))

    eventually(stages_done)
    for service, stage in zip(("encoder", "dit", "decoder"), STAGES):
        assert moved(service, "disagfusion_stage_seconds_count", stage=stage, model="tiny")
        assert moved(service, "disagfusion_batch_size_sum", 2, stage=stage, model="tiny")
        assert after[service][("disagfusion_in_flight_tasks", frozenset({("stage", stage)}))] == 0  # all acked

    def handed(service: str, direction: str) -> dict[str, float]:
        """Bytes ``service`` put or got during the jobs, per transport that moved."""
        moved_by = {}
        for transport in ("inline", "shm", "redis", "cuda_ipc"):
            labels = {"transport": transport, "direction": direction}
            delta = (get(after[service], "disagfusion_handoff_bytes_total", **labels)
                     - get(before[service], "disagfusion_handoff_bytes_total", **labels))
            if delta:
                moved_by[transport] = delta
        return moved_by

    # What one stage puts, through whichever transports its tensors' sizes chose, the next gets.
    assert handed("encoder", "put") and handed("encoder", "put") == handed("dit", "get")
    assert handed("dit", "put") and handed("dit", "put") == handed("decoder", "get")

    gateway = after["gateway"]
    assert moved("gateway", "disagfusion_gateway_requests_total", method="POST", route="/v1/images/generations",
                 status="200")
    assert moved("gateway", "disagfusion_gateway_request_seconds_count", method="POST",
                 route="/v1/images/generations")
    assert get(gateway, "disagfusion_gateway_nats_up") == 1
    for stage in STAGES:
        assert ("disagfusion_stage_backlog_tasks", frozenset({("stage", stage)})) in gateway, stage


def test_unknown_paths_share_one_route_label(gateway_stack: Launcher) -> None:
    url = gateway_stack.state().gateway_url
    for path in ("/nope/1", "/nope/2"):
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{url}{path}", timeout=10)
    samples = scrape(f"{url}/metrics")
    assert get(samples, "disagfusion_gateway_requests_total", method="GET", route="unmatched", status="404") >= 2
    assert not [key for key in samples if any("nope" in value for _, value in key[1])]


def test_status_lists_each_processs_metrics_endpoint(gateway_stack: Launcher) -> None:
    done = CliRunner().invoke(app, ["status", "--json", "--data-dir", str(gateway_stack.data_dir)])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["metrics"] == gateway_stack.state().metrics_urls


def test_the_gateways_metrics_answer_at_once_while_nats_is_away(start_gateway: GatewayStarter) -> None:
    url = start_gateway(f"nats://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    samples = scrape(f"{url}/metrics")
    assert time.monotonic() - started < 3
    assert get(samples, "disagfusion_gateway_nats_up") == 0
    assert not [key for key in samples if key[0] == "disagfusion_stage_backlog_tasks"]
