"""Compose tests: the real `docker compose` binary against a real Docker engine, host networking
only (deploy/compose.hostnet.yaml), so they run on machines that allow loopback traffic only.

Every test here is skipped when no Docker engine answers; `make test-compose` starts one and
builds the images first. Images come from the environment as compose reads it: `make
test-compose` exports DF_NATS_IMAGE / DF_REDIS_IMAGE pointing at the local stand-ins
(disagfusion/nats:local, disagfusion/redis:local) and DF_IMAGE for the project image.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from python_on_whales import DockerClient

from compose_support import HOSTNET_OVERRIDE, PROJECT_IMAGE, ComposeStack, compose_client, engine_problem, free_port


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
    started: list[ComposeStack] = []

    def up(
        services: list[str] | None = None, scales: dict[str, int] | None = None, wait_timeout: int = 180
    ) -> ComposeStack:
        nats_port, monitor_port, redis_port = free_port(), free_port(), free_port()
        env_file = tmp_path / f"stack{len(started)}.env"
        env_file.write_text(
            f"DF_NATS_PORT={nats_port}\nDF_NATS_MONITOR_PORT={monitor_port}\nDF_REDIS_PORT={redis_port}\n"
        )
        project = f"dftest-{uuid.uuid4().hex[:10]}"
        stack = ComposeStack(
            docker=compose_client(HOSTNET_OVERRIDE, project=project, env_file=env_file),
            project=project,
            nats_url=f"nats://127.0.0.1:{nats_port}",
            nats_monitor_url=f"http://127.0.0.1:{monitor_port}",
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
        )
        started.append(stack)  # before `up`, so a stack that fails half-way is removed too
        stack.docker.compose.up(
            services=services,
            scales=scales or {},
            detach=True,
            wait=True,
            wait_timeout=wait_timeout,
            pull="never",
            quiet=True,
        )
        return stack

    yield up
    for stack in started:
        stack.docker.compose.down(volumes=True, remove_orphans=True, timeout=30, quiet=True)


@pytest.fixture(scope="session")
def project_image() -> str:
    """The project image (`make image` builds it); tests that run it skip while it is missing."""
    if not DockerClient().image.exists(PROJECT_IMAGE):
        pytest.skip(f"project image {PROJECT_IMAGE} not built; run `make image`")
    return PROJECT_IMAGE
