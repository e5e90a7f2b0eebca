"""Actuators over a ``disagfusion.deployment.Deployment``: the embedded stack (local processes)
and docker compose, and the choice among every actuator by ``DF_SCHED_ACTUATOR``.

A deployment's calls block (process start-up, ``docker compose up --wait``, draining a stopped
replica) so they run in a thread; scale-down drains, as both deployments send SIGTERM and wait."""

from __future__ import annotations

import asyncio
from pathlib import Path

from disagfusion.deployment import ComposeDeployment, Deployment, LocalDeployment
from disagfusion.launcher import Launcher
from services.scheduler.actuators import Actuator, DryRunActuator, KubernetesActuator


class DeploymentActuator:
    """Scales only the services it is asked about, and only those whose count changes: first
    every service that grows, then every one that shrinks. A shrinking instance stops pulling at
    SIGTERM and only finishes the batch it runs, so its slot is as good as free while its
    successor starts; growing first overlaps the drain (long for a DiT running a video job)
    with start-up instead of making the new instances wait for it, at the price of briefly
    running the draining instances on top of the pool (Kubernetes' maxSurge)."""

    def __init__(self, deployment: Deployment):
        self.deployment = deployment

    async def apply(self, desired: dict[str, int]) -> None:
        running = await self.running()
        grow = {name: n for name, n in desired.items() if n > running.get(name, 0)}
        shrink = {name: n for name, n in desired.items() if n < running.get(name, 0)}
        for changes in (grow, shrink):
            if changes:
                await asyncio.to_thread(self.deployment.scale, changes)

    async def running(self) -> dict[str, int]:
        return await asyncio.to_thread(self.deployment.running)


class LocalActuator(DeploymentActuator):
    """The embedded stack whose state lives in ``data_dir`` (``disagfusion up --data-dir``)."""

    def __init__(self, data_dir: Path):
        super().__init__(LocalDeployment(Launcher(data_dir)))


class ComposeActuator(DeploymentActuator):
    """A docker compose project, named by the files, env files and project name that brought it
    up (the variables they interpolate must be the same, or new replicas would differ from the
    running ones). In a container it needs the docker CLI and the engine's socket: the image
    has the CLI, deploy/compose.scheduler.yaml mounts the socket and the project directory."""

    def __init__(self, compose_files: list[Path], project: str | None = None, env_files: list[Path] | None = None):
        super().__init__(ComposeDeployment(compose_files, project, env_files))


def make_actuator(
    kind: str,
    *,
    data_dir: Path,
    compose_files: list[Path],
    compose_env_files: list[Path],
    project: str | None,
    namespace: str,
) -> Actuator:
    if kind == "dry-run":
        return DryRunActuator()
    if kind == "local":
        return LocalActuator(data_dir)
    if kind == "compose":
        return ComposeActuator(compose_files, project, compose_env_files)
    if kind == "kubernetes":
        return KubernetesActuator.from_environment(namespace)
    raise ValueError(f"unknown actuator {kind!r}: dry-run, local, compose or kubernetes")
