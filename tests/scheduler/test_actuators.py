"""The Kubernetes actuator, run through the official client against a local HTTP server that
plays a recorded API contract: the requests it sends must match the contract exactly."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from kubernetes import client as k8s

from services.scheduler.actuators import DryRunActuator, KubernetesActuator

CONTRACT = json.loads((Path(__file__).parent / "contracts" / "k8s_scale.json").read_text())["exchanges"]


class _ApiServer:
    """Answers each (method, path) from the contract and records what it was sent."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        responses = {(e["request"]["method"], e["request"]["path"]): e["response"] for e in CONTRACT}
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                received.append(
                    {
                        "method": self.command,
                        "path": url.path,
                        "query": dict(parse_qsl(url.query)),
                        "content_type": self.headers.get("Content-Type"),
                        "body": json.loads(raw) if raw else None,
                    }
                )
                response = responses.get((self.command, url.path))
                status, body = (response["status"], response["body"]) if response else (
                    404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
                )
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def api() -> Iterator[_ApiServer]:
    server = _ApiServer()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def _actuator(api: _ApiServer) -> KubernetesActuator:
    configuration = k8s.Configuration(host=api.url)
    return KubernetesActuator("disagfusion", k8s.ApiClient(configuration))


async def test_apply_sends_exactly_the_recorded_requests(api: _ApiServer) -> None:
    await _actuator(api).apply({"dit-h100": 5, "encoder-l4": 1, "decoder-l4": 0})
    assert api.received == [e["request"] for e in CONTRACT]


async def test_apply_patches_nothing_when_replicas_already_match(api: _ApiServer) -> None:
    await _actuator(api).apply({"dit-h100": 2, "encoder-l4": 1, "decoder-l4": 3})
    assert [(r["method"], r["path"]) for r in api.received] == [
        ("GET", "/apis/apps/v1/namespaces/disagfusion/deployments")
    ]


async def test_apply_refuses_an_unknown_deployment(api: _ApiServer) -> None:
    with pytest.raises(LookupError, match="vae-tpu"):
        await _actuator(api).apply({"vae-tpu": 1})
    assert all(r["method"] == "GET" for r in api.received)


async def test_running_reads_ready_replicas(api: _ApiServer) -> None:
    assert await _actuator(api).running() == {"dit-h100": 2, "encoder-l4": 1, "decoder-l4": 2}


async def test_dry_run_remembers_without_acting() -> None:
    actuator = DryRunActuator()
    assert await actuator.running() == {}
    await actuator.apply({"dit": 3})
    assert await actuator.running() == {"dit": 3}
