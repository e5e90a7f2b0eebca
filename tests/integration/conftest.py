"""An embedded stack (real nats-server, redis-server and the three stage services as separate
processes, started from compose.yaml by the launcher) and the tiny model it serves."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from disagfusion.launcher import Launcher

StackStarter = Callable[..., Launcher]


@contextmanager
def running_stack(data_dir: Path, models_dir: Path, scales: dict[str, int] | None = None,
                  monolithic: bool = False, tenants: tuple[str, ...] = ()) -> Iterator[Launcher]:
    launcher = Launcher(data_dir, models_dir=models_dir, monolithic=monolithic)
    try:
        launcher.up(scales, tenants=tenants)
        yield launcher
    finally:
        launcher.down(timeout=20)


@pytest.fixture
def start_stack(tmp_path: Path, tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StackStarter]:
    """Start a stack serving the tiny model; extra environment (e.g. DF_DTYPE) applies to its services."""
    numbers = itertools.count()
    with ExitStack() as stacks:

        def start(scales: dict[str, int] | None = None, tenants: tuple[str, ...] = (), **env: str) -> Launcher:
            for key, value in {"DF_MODELS": "tiny", **env}.items():
                monkeypatch.setenv(key, value)
            data_dir = tmp_path / f"stack{next(numbers)}"
            return stacks.enter_context(running_stack(data_dir, tiny_models_dir, scales, tenants=tenants))

        yield start


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Launcher]:
    """One fp32 stack with a single process per stage, shared by a test module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DF_MODELS", "tiny")
        with running_stack(tmp_path_factory.mktemp("stack"), tiny_models_dir) as launcher:
            yield launcher
