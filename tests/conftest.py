"""Real servers for tests: nats-server (JetStream) and redis-server on free loopback ports."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from disagfusion.launcher import _binary, _wait_port, free_port


@contextmanager
def _server(command: list[str], port: int, what: str, log: Path) -> Iterator[None]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_port(port, proc, what)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    command = [_binary("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")]
    with _server(command, port, "nats-server", tmp_path / "nats.log"):
        yield f"nats://127.0.0.1:{port}"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    command = [_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(tmp_path)]
    with _server(command, port, "redis-server", tmp_path / "redis.log"):
        yield f"redis://127.0.0.1:{port}/0"
