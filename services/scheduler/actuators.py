"""Actuators turn the scheduler's desired instance counts into running instances. Keys are
workload names: compose services (``dit``) or, on a multi-class pool, Deployments per stage and
device class (``dit-h100``; see ``pool.deployment_replicas``). Scale-down drains: the platform
stops an instance with SIGTERM and the stage worker finishes its batch before it exits, so
nothing acked is lost and nothing unacked is dropped (JetStream redelivers it).

The local (embedded launcher) and docker compose actuators implement the same protocol."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from kubernetes import client as k8s

log = logging.getLogger(__name__)


class Actuator(Protocol):
    async def apply(self, desired: dict[str, int]) -> None:
        """Ask for exactly ``desired`` instances of each named workload."""

    async def running(self) -> dict[str, int]:
        """Instances of each workload that are up and serving."""


class DryRunActuator:
    """Applies nothing: logs and remembers each decision (for ``--dry-run`` and planning)."""

    def __init__(self) -> None:
        self.applied: list[dict[str, int]] = []

    async def apply(self, desired: dict[str, int]) -> None:
        if not self.applied or self.applied[-1] != desired:
            log.info("dry-run: would scale to %s", desired)
        self.applied.append(dict(desired))

    async def running(self) -> dict[str, int]:
        return dict(self.applied[-1]) if self.applied else {}


class KubernetesActuator:
    """Sets ``spec.replicas`` through each Deployment's scale subresource with a JSON merge patch
    (what ``kubectl scale`` changes, nothing else), patching only Deployments whose
    ``spec.replicas`` differs, and reads ready replicas back. The Deployment controller replaces
    dead pods by itself. The official client is synchronous, so its calls run in a thread."""

    PATCH_CONTENT_TYPE = "application/merge-patch+json"

    def __init__(
        self,
        namespace: str,
        api_client: k8s.ApiClient | None = None,
        label_selector: str = "app.kubernetes.io/part-of=disagfusion",
    ):
        self.namespace = namespace
        self.label_selector = label_selector
        self._apps = k8s.AppsV1Api(api_client)

    @classmethod
    def from_environment(cls, namespace: str) -> KubernetesActuator:
        """In a pod: its service account; elsewhere: the current kubeconfig context."""
        from kubernetes import config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(namespace)

    def _deployments(self) -> list[k8s.V1Deployment]:
        return self._apps.list_namespaced_deployment(self.namespace, label_selector=self.label_selector).items

    def _apply(self, desired: dict[str, int]) -> None:
        current = {d.metadata.name: d.spec.replicas for d in self._deployments()}
        for name, replicas in sorted(desired.items()):
            if name not in current:
                raise LookupError(
                    f"no Deployment {name!r} labelled {self.label_selector} in namespace {self.namespace!r}"
                )
            if current[name] != replicas:
                self._apps.patch_namespaced_deployment_scale(
                    name, self.namespace, {"spec": {"replicas": replicas}}, _content_type=self.PATCH_CONTENT_TYPE
                )

    async def apply(self, desired: dict[str, int]) -> None:
        await asyncio.to_thread(self._apply, desired)

    async def running(self) -> dict[str, int]:
        deployments = await asyncio.to_thread(self._deployments)
        return {d.metadata.name: d.status.ready_replicas or 0 for d in deployments}
