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


# Module scope: a server per test module keeps the suite fast; tests use fresh job ids and
# consume what they publish, so they do not see each other's work.


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port, directory = free_port(), tmp_path_factory.mktemp("nats")
    command = [_binary("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(directory / "js")]
    with _server(command, port, "nats-server", directory / "nats.log"):
        yield f"nats://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port, directory = free_port(), tmp_path_factory.mktemp("redis")
    command = [_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(directory)]
    with _server(command, port, "redis-server", directory / "redis.log"):
        yield f"redis://127.0.0.1:{port}/0"
