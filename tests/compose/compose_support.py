"""What compose tests share besides fixtures: file paths, a compose client, the stack record.
A plain module, not conftest, so tests import it by a name that no other conftest takes."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from python_on_whales import DockerClient
from python_on_whales.exceptions import DockerException, NoSuchContainer
from typer.testing import CliRunner

from disagfusion_cli import app
from disagfusion.auth import ROLES, env_password
from disagfusion.bus import wait_out_unavailable
from disagfusion.client import Client
from disagfusion.config import Settings
from disagfusion.credentials import generate_password
from disagfusion.launcher import free_port
from disagfusion.protocol import RESULTS_STREAM, JobSpec, Result, TimingSample, metrics_subject, results_subject, unpack

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
GPU_OVERRIDE = ROOT / "deploy" / "compose.gpu.yaml"
HOSTNET_OVERRIDE = ROOT / "deploy" / "compose.hostnet.yaml"
SCHEDULER_OVERRIDE = ROOT / "deploy" / "compose.scheduler.yaml"
JOIN_OVERRIDE = ROOT / "deploy" / "compose.join.yaml"
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


def compose_client(
    *overrides: Path, project: str | None = None, env_file: Path | None = None, profiles: list[str] | None = None
) -> DockerClient:
    """Compose on compose.yaml plus the given override files, as `docker compose -f ... -f ...`."""
    return DockerClient(
        compose_files=[COMPOSE_FILE, *overrides],
        compose_project_name=project,
        compose_env_files=[env_file] if env_file else [],
        compose_profiles=profiles or [],
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
        return [state.health.status for state in self._states(service, all=False) if state.health]

    def running(self, service: str) -> int:
        return sum(state.running for state in self._states(service, all=True))

    def _states(self, service: str, all: bool) -> list:
        """The service's containers' states; one removed between listing and inspecting (a
        drained replica the scheduler takes away) is simply gone."""
        states = []
        for container in self.docker.compose.ps(services=[service], all=all):
            try:
                states.append(container.state)
            except NoSuchContainer:
                pass
        return states

    def options(self) -> list[str]:
        """The CLI's options that name this project: `disagfusion scale ... *stack.options()`."""
        return ["-f", str(COMPOSE_FILE), "-f", str(HOSTNET_OVERRIDE), "-p", self.project, "--env-file", str(self.env_file)]

    def nats_clients(self, service: str) -> set[str]:
        """Names of the NATS connections of a service's workers (`dit@host:pid:rand`), from /connz."""
        with urllib.request.urlopen(f"{self.nats_monitor_url}/connz?limit=1024", timeout=5) as answer:
            connections = json.load(answer)["connections"]
        return {c["name"] for c in connections if c.get("name", "").startswith(f"{service}@")}

    def exit_codes(self, service: str, since: datetime, until: datetime) -> list[str]:
        """Exit codes of the service's containers that stopped in [since, until], from the engine's events."""
        return [
            event.actor.attributes.get("exitCode")
            for event in self.docker.system.events(
                since=since,
                until=until,
                filters={"label": f"com.docker.compose.project={self.project}", "event": "die"},
            )
            if event.actor.attributes.get("com.docker.compose.service") == service
        ]


def cli(stack: ComposeStack, *args: str) -> str:
    """Run `disagfusion ARGS` in-process against the stack; fails the test on a non-zero exit."""
    result = CliRunner().invoke(app, list(args), env={"DF_NATS_URL": stack.nats_url}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def specs_for(label: str, count: int, steps: int) -> list[JobSpec]:
    return [JobSpec(prompt=f"{label} {i}", seed=i, steps=steps, width=64, height=64) for i in range(count)]


class Batch:
    """Runs jobs through a Client and records which worker of one stage ran what (its
    df.metrics.<stage> timing samples)."""

    def __init__(self, settings: Settings, specs: list[JobSpec], stage: str = "denoise"):
        self.settings = settings
        self.specs = specs
        self.stage = stage
        self.results: list[Result] = []
        self.runs: Counter[str] = Counter()
        """How many times the stage ran each job."""
        self.workers: set[str] = set()
        """The stage's workers that ran part of the batch."""
        self.result_counts: dict[str, int] = {}
        """Result messages per job in the DF_RESULTS stream."""

    async def run(self, when_some_done: Callable[[], object] | None = None, after: int = 3) -> None:
        """Submit every job and wait for all results; `when_some_done()` (blocking, run in a
        thread while results keep coming) is called once `after` results are in."""
        async with Client(self.settings) as client:

            async def seen(msg) -> None:
                sample = unpack(TimingSample, msg.data)
                self.workers.add(sample.worker)
                self.runs.update(job.job_id for job in sample.jobs)

            await client._bus.nc.subscribe(metrics_subject(self.stage), cb=seen)
            action = None
            async for result in client.run_many(self.specs, timeout=180):
                self.results.append(result)
                if when_some_done is not None and action is None and len(self.results) >= after:
                    action = asyncio.create_task(asyncio.to_thread(when_some_done))
            if action is not None:
                await action
            await client._bus.nc.flush()
            info = await wait_out_unavailable(
                lambda: client._js.stream_info(RESULTS_STREAM, subjects_filter="df.results.>"))
        self.result_counts = {spec.job_id: info.state.subjects.get(results_subject(spec.job_id), 0) for spec in self.specs}

    def assert_each_job_done_once(self) -> None:
        failed = [(r.job_id, r.error) for r in self.results if r.status != "ok"]
        assert not failed, failed
        assert sorted(r.job_id for r in self.results) == sorted(s.job_id for s in self.specs)
        # exactly one result message per job in DF_RESULTS: nothing lost, nothing doubled
        assert set(self.result_counts.values()) == {1}, self.result_counts


@contextmanager
def compose_up(
    directory: Path,
    services: list[str] | None = None,
    scales: dict[str, int] | None = None,
    env: dict[str, str] | None = None,
    wait_timeout: int = 180,
    overrides: tuple[Path, ...] = (),
) -> Iterator[ComposeStack]:
    """compose.yaml + the hostnet override (+ `overrides`) up under a unique project name on free
    loopback ports, health checks passed; `env` adds compose variables (DF_MODELS, ...) to its env file. On exit
    removes its containers and volumes (`down -v`), also when `up` failed half-way."""
    nats_port, monitor_port, redis_port, gateway_port = free_port(), free_port(), free_port(), free_port()
    project = f"dftest-{uuid.uuid4().hex[:10]}"
    env_file = directory / f"{project}.env"
    # Passwords of its own for every role (not compose's public df-dev-* defaults); the test
    # talks to the servers as admin.
    passwords = {env_password(role, server): generate_password() for server in ("nats", "redis") for role in ROLES}
    variables = {"DF_NATS_PORT": nats_port, "DF_NATS_MONITOR_PORT": monitor_port, "DF_REDIS_PORT": redis_port,
                 "DF_GATEWAY_PORT": gateway_port, **passwords, **(env or {})}
    env_file.write_text("".join(f"{key}={value}\n" for key, value in variables.items()))
    stack = ComposeStack(
        docker=compose_client(HOSTNET_OVERRIDE, *overrides, project=project, env_file=env_file),
        project=project,
        env_file=env_file,
        nats_url=f"nats://admin:{passwords['DF_NATS_ADMIN_PASSWORD']}@127.0.0.1:{nats_port}",
        nats_monitor_url=f"http://127.0.0.1:{monitor_port}",
        redis_url=f"redis://admin:{passwords['DF_REDIS_ADMIN_PASSWORD']}@127.0.0.1:{redis_port}/0",
    )
    try:
        stack.docker.compose.up(
            services=services, scales=scales or {}, detach=True, wait=True, wait_timeout=wait_timeout,
            pull="never", quiet=True,
        )
        yield stack
    finally:
        stack.docker.compose.down(volumes=True, remove_orphans=True, timeout=30, quiet=True)
