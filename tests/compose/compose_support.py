"""What compose tests share besides fixtures: file paths, a compose client, the stack record.
A plain module, not conftest, so tests import it by a name that no other conftest takes."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from python_on_whales import DockerClient
from python_on_whales.exceptions import DockerException

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ComposeStack:
    """A compose project brought up by the `compose_stack` fixture; `docker` runs compose on it."""

    docker: DockerClient
    project: str
    nats_url: str
    nats_monitor_url: str
    redis_url: str

    def health(self, service: str) -> list[str]:
        """Health of each container of a service: "healthy", "starting" or "unhealthy"."""
        return [c.state.health.status for c in self.docker.compose.ps(services=[service]) if c.state.health]
