"""What compose tests share besides fixtures: file paths, a compose client, the stack record.
A plain module, not conftest, so tests import it by a name that no other conftest takes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from python_on_whales import DockerClient
from python_on_whales.exceptions import DockerException

from disagfusion.launcher import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
GPU_OVERRIDE = ROOT / "deploy" / "compose.gpu.yaml"
HOSTNET_OVERRIDE = ROOT / "deploy" / "compose.hostnet.yaml"
PROJECT_IMAGE = os.environ.get("DF_IMAGE", "disagfusion:latest")


def engine_problem() -> str | None:
    """Why compose cannot run here, or None when the engine and the compose plugin answer."""
    docker = DockerClient()
    try:
        docker.compose.version()
    except (DockerException, FileNotFoundError) as exc:
        return f"no `docker compose` plugin ({exc}); run `make docker-setup`"
    try:
        docker.info()
    except DockerException as exc:
        said = (exc.stderr or "").strip().splitlines()
        return f"no Docker engine answers ({said[-1] if said else 'docker info failed'}); run `make test-compose`"
    return None


def compose_client(*overrides: Path, project: str | None = None, env_file: Path | None = None) -> DockerClient:
    """Compose on compose.yaml plus the given override files, as `docker compose -f ... -f ...`."""
    return DockerClient(
        compose_files=[COMPOSE_FILE, *overrides],
        compose_project_name=project,
        compose_env_files=[env_file] if env_file else [],
    )


@dataclass(frozen=True)
class ComposeStack:
    """A compose project brought up by `compose_up`; `docker` runs compose on it."""

    docker: DockerClient
    project: str
    env_file: Path
    nats_url: str
    nats_monitor_url: str
    redis_url: str

    def health(self, service: str) -> list[str]:
        """Health of each container of a service: "healthy", "starting" or "unhealthy"."""
        return [c.state.health.status for c in self.docker.compose.ps(services=[service]) if c.state.health]


@contextmanager
def compose_up(
    directory: Path,
    services: list[str] | None = None,
    scales: dict[str, int] | None = None,
    env: dict[str, str] | None = None,
    wait_timeout: int = 180,
) -> Iterator[ComposeStack]:
    """compose.yaml + the hostnet override up under a unique project name on free loopback ports,
    health checks passed; `env` adds compose variables (DF_MODELS, ...) to its env file. On exit
    removes its containers and volumes (`down -v`), also when `up` failed half-way."""
    nats_port, monitor_port, redis_port = free_port(), free_port(), free_port()
    project = f"dftest-{uuid.uuid4().hex[:10]}"
    env_file = directory / f"{project}.env"
    variables = {"DF_NATS_PORT": nats_port, "DF_NATS_MONITOR_PORT": monitor_port, "DF_REDIS_PORT": redis_port, **(env or {})}
    env_file.write_text("".join(f"{key}={value}\n" for key, value in variables.items()))
    stack = ComposeStack(
        docker=compose_client(HOSTNET_OVERRIDE, project=project, env_file=env_file),
        project=project,
        env_file=env_file,
        nats_url=f"nats://127.0.0.1:{nats_port}",
        nats_monitor_url=f"http://127.0.0.1:{monitor_port}",
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
    )
    try:
        stack.docker.compose.up(
            services=services, scales=scales or {}, detach=True, wait=True, wait_timeout=wait_timeout,
            pull="never", quiet=True,
        )
        yield stack
    finally:
        stack.docker.compose.down(volumes=True, remove_orphans=True, timeout=30, quiet=True)
