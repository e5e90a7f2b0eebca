"""A stack whose gateway the launcher starts from compose.yaml like every other service, and
gateways of their own (other settings, another NATS) for the cases one stack cannot show."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import openai
import pytest

from disagfusion.launcher import Launcher, free_port, stop_process, wait_port
from tests.integration.conftest import running_stack

MODELS = "tiny,emulated-video"

GatewayStarter = Callable[..., str]


@pytest.fixture(scope="package")
def gateway_stack(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Launcher]:
    """One fp32 stack serving the tiny image model and the emulated video model, gateway included,
    shared by the modules here (each measures what it changes, not absolute counts): a stack
    costs seconds of the default suite to start."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DF_MODELS", MODELS)
        with running_stack(tmp_path_factory.mktemp("stack"), tiny_models_dir) as launcher:
            yield launcher


@pytest.fixture(scope="package")
def gateway_url(gateway_stack: Launcher) -> str:
    url = gateway_stack.state().gateway_url
    assert url is not None, "the launcher started no gateway from compose.yaml"
    return url


@pytest.fixture(scope="package")
def sdk(gateway_url: str) -> openai.OpenAI:
    """The official OpenAI SDK against the stack's gateway; no retries, so each error is seen once."""
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0)


@contextmanager
def _gateway(nats_url: str, log: Path, **env: str) -> Iterator[str]:
    port = free_port()
    environ = {**os.environ, "DF_NATS_URL": nats_url, "DF_GATEWAY_PORT": str(port),
               "DF_HEALTH_FILE": str(log.with_suffix(".health")), **env}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], env=environ, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_port(port, proc, "gateway")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[GatewayStarter]:
    """Start ``python -m services.gateway`` for NATS at ``nats_url`` with extra ``DF_*``
    settings; returns its URL. Stopped at the end of the test."""
    with ExitStack() as gateways:

        def start(nats_url: str, **env: str) -> str:
            log = tmp_path / f"gateway-{free_port()}.log"
            return gateways.enter_context(_gateway(nats_url, log, **env))

        yield start
