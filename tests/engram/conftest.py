"""Fixtures for the Engram tests: arenas in /dev/shm that are always removed, and a real
engram_store process (nats-server and redis-server come from tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from disagfusion.launcher import stop_process

SHM = Path("/dev/shm")


def new_arena_path() -> Path:
    return SHM / f"df-engram-test-{uuid.uuid4().hex}.arena"


@pytest.fixture
def shm_arena_path() -> Iterator[str]:
    path = new_arena_path()
    yield str(path)
    path.unlink(missing_ok=True)


def start_engram_store(
    nats_url: str, arenas: list[str], scratch_dir: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``python -m services.engram_store`` as its own process, returned once it serves."""
    env = {
        **os.environ, "PYTHONPATH": os.getcwd(), "DF_NATS_URL": nats_url, "DF_ENGRAM_SCRATCH_DIR": scratch_dir, **(env or {})
    }
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
    stop_process(proc)


@pytest.fixture(scope="module")
def scratch_dir() -> Iterator[str]:
    path = SHM / f"df-engram-test-scratch-{uuid.uuid4().hex}"
    yield str(path)
    shutil.rmtree(path, ignore_errors=True)
