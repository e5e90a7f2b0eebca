"""The running deployment, whichever it is: the embedded launcher or docker compose.

``disagfusion scale`` and ``status`` (and the scheduler's actuators) talk to a ``Deployment``
and need not know how the services run. Both kinds drain on scale-down: the launcher sends
SIGTERM and waits; docker compose stops surplus containers with SIGTERM and waits
``stop_grace_period`` (compose.yaml), during which a stage finishes and acks its batch (the jobs
it fetched ahead it hands back at once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from disagfusion.config import Settings
from disagfusion.errors import DisagFusionError
from disagfusion.launcher import COMPOSE_FILE, Launcher, LauncherError, load_services


class DeploymentError(DisagFusionError, RuntimeError):
    """The running deployment could not be found or refused a change."""


class Deployment(Protocol):
    kind: str

    def running(self) -> dict[str, int]:
        """Replicas running per application service."""

    def scale(self, replicas: dict[str, int]) -> None:
        """Set replicas of the named services; the others are left alone."""

    def client_settings(self) -> Settings:
        """How a client reaches this deployment's NATS."""


class LocalDeployment:
    """The embedded stack of ``disagfusion up``."""

    kind = "local"

    def __init__(self, launcher: Launcher):
        self.launcher = launcher

    def running(self) -> dict[str, int]:
        return self.launcher.running()

    def scale(self, replicas: dict[str, int]) -> None:
        try:
            for service, count in replicas.items():
                self.launcher.scale(service, count)
        except LauncherError as exc:
            raise DeploymentError(str(exc)) from exc

    def client_settings(self) -> Settings:
        return self.launcher.client_settings()


class ComposeDeployment:
    """A docker compose project, driven through python-on-whales.

    Scaling is one ``docker compose up --scale ... --no-recreate --detach --wait`` per change,
    which starts or removes replicas and never recreates healthy containers."""

    kind = "compose"

    def __init__(self, compose_files: list[Path], project: str | None = None, env_files: list[Path] | None = None):
        from python_on_whales import DockerClient

        self.compose_files = compose_files
        self.services = sorted(load_services(compose_files[0]))
        self.docker = DockerClient(
            compose_files=compose_files, compose_project_name=project, compose_env_files=env_files or []
        )

    def running(self) -> dict[str, int]:
        counts = dict.fromkeys(self.services, 0)
        for container in self.docker.compose.ps():
            service = container.config.labels.get("com.docker.compose.service")
            if service in counts and container.state.running:
                counts[service] += 1
        return counts

    def scale(self, replicas: dict[str, int]) -> None:
        unknown = set(replicas) - set(self.services)
        if unknown:
            raise DeploymentError(f"unknown service(s) {sorted(unknown)}; compose has {self.services}")
        self.docker.compose.up(
            services=list(replicas), scales=replicas, detach=True, recreate=False, wait=True, dependencies=False
        )

    def client_settings(self) -> Settings:
        return Settings()  # DF_NATS_URL from the environment: compose publishes NATS on the host


def detect(
    data_dir: Path,
    compose_files: list[Path] | None = None,
    project: str | None = None,
    env_files: list[Path] | None = None,
) -> Deployment:
    """The embedded stack if one runs from ``data_dir``, else the docker compose project."""
    launcher = Launcher(data_dir)
    if launcher.state() is not None and launcher.running():
        return LocalDeployment(launcher)
    try:
        compose = ComposeDeployment(compose_files or [COMPOSE_FILE], project, env_files)
        if any(compose.running().values()):
            return compose
    except Exception as exc:  # no docker CLI, no engine, no such project
        raise DeploymentError(
            f"no embedded stack runs from {data_dir} and no docker compose project answered ({exc})"
        ) from exc
    raise DeploymentError(f"no deployment is running: neither an embedded stack in {data_dir} nor a compose project")
