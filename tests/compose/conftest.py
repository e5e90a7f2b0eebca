"""Compose tests: the real `docker compose` binary against a real Docker engine, host networking
only (deploy/compose.hostnet.yaml), so they run on machines that allow loopback traffic only.

Every test here is skipped when no Docker engine answers; `make test-compose` starts one and
builds the images first. Images come from the environment as compose reads it: `make
test-compose` exports DF_NATS_IMAGE / DF_REDIS_IMAGE pointing at the local stand-ins
(disagfusion/nats:local, disagfusion/redis:local) and DF_IMAGE for the project image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from python_on_whales import DockerClient

from compose_support import PROJECT_IMAGE, ComposeStack, compose_up, engine_problem


@pytest.fixture(scope="session", autouse=True)
def docker_engine() -> None:
    problem = engine_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture
def compose_stack(tmp_path: Path) -> Iterator[Callable[..., ComposeStack]]:
    """Brings up compose.yaml + the hostnet override under a unique project name on free loopback
    ports and waits for the health checks; removes its containers and volumes (`down -v`) after.

        def test_x(compose_stack):
            infra = compose_stack(services=["nats", "redis"])
            stack = compose_stack(scales={"dit": 3})   # whole stack: needs the project image
    """
    with ExitStack() as stacks:
        yield lambda **options: stacks.enter_context(compose_up(tmp_path, **options))


ACK_WAIT_S = 10
"""Short, so tasks a killed worker held come back soon (compose.yaml passes DF_ACK_WAIT_S on)."""


@pytest.fixture(scope="session")
def stack(project_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    """The whole deployment (compose.yaml + the hostnet override, the tiny model only), shared by
    the modules that drive it (test_stack.py, test_scheduler_actuator.py): bringing it up is most
    of their time. Each test leaves it as it found it: one replica of each stage, no scheduler."""
    with compose_up(
        tmp_path_factory.mktemp("compose"),
        env={"DF_MODELS": "tiny", "DF_ACK_WAIT_S": str(ACK_WAIT_S)},
        wait_timeout=300,
    ) as stack:
        yield stack


@pytest.fixture(scope="session")
def project_image() -> str:
    """The project image (`make image` builds it); tests that run it skip while it is missing."""
    if not DockerClient().image.exists(PROJECT_IMAGE):
        pytest.skip(f"project image {PROJECT_IMAGE} not built; run `make image`")
    return PROJECT_IMAGE
