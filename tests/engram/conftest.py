"""Fixtures for the Engram tests: arenas in /dev/shm that are always removed, and (until
tests/conftest.py lands on main) real nats-server / redis-server processes on free ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
SHM = Path("/dev/shm")


def new_arena_path() -> Path:
    return SHM / f"df-engram-test-{uuid.uuid4().hex}.arena"


@pytest.fixture
def shm_arena_path() -> Iterator[str]:
    path = new_arena_path()
    yield str(path)
    path.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


def _binary(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    store = tmp_path_factory.mktemp("nats")
    proc = subprocess.Popen(
        [_binary("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc, "nats-server")
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=os.getcwd(),
    )
    try:
        _wait_port(port, proc, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def start_engram_store(nats_url: str, arenas: list[str], scratch_dir: str) -> subprocess.Popen:
    """``python -m services.engram_store`` as its own process, returned once it serves."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "DF_NATS_URL": nats_url, "DF_ENGRAM_SCRATCH_DIR": scratch_dir}
    args = [sys.executable, "-m", "services.engram_store"] + [f"--arena={a}" for a in arenas]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "engram_store ready" in line:
            return proc
    proc.wait(10)
    raise RuntimeError("engram_store did not start:\n" + "".join(lines))


def stop_engram_store(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def scratch_dir() -> Iterator[str]:
    path = SHM / f"df-engram-test-scratch-{uuid.uuid4().hex}"
    yield str(path)
    shutil.rmtree(path, ignore_errors=True)
