"""The scheduler's compose actuator on the real engine, on the session's stack: driven directly
from the host (services/scheduler/deploy_actuators.py), and from inside the scheduler running as
the compose service (deploy/compose.scheduler.yaml), acting on a pin set with `disagfusion scale`.

Each test leaves the stack as it found it: one replica per stage, no scheduler."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from python_on_whales import DockerClient
from python_on_whales.exceptions import DockerException

from compose_support import (
    COMPOSE_FILE,
    HOSTNET_OVERRIDE,
    SCHEDULER_OVERRIDE,
    Batch,
    ComposeStack,
    cli,
    specs_for,
)
from disagfusion.config import Settings
from services.scheduler.deploy_actuators import ComposeActuator

pytestmark = pytest.mark.timeout(400)

DOCKER_SOCKET = Path("/var/run/docker.sock")
PROJECT_IN_CONTAINER = "/srv/disagfusion/project"
"""Where deploy/compose.scheduler.yaml mounts the project directory."""


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting until {what}"
        time.sleep(1)


@pytest.fixture
def one_decoder(stack: ComposeStack) -> Iterator[ComposeStack]:
    """The stack, given back with a single decoder even when the test failed half-way."""
    assert stack.running("decoder") == 1
    yield stack
    if stack.running("decoder") != 1:
        stack.docker.compose.up(
            services=["decoder"], scales={"decoder": 1}, detach=True, recreate=False, dependencies=False,
            wait=True, pull="never", quiet=True,
        )


def test_compose_actuator_scales_up_and_drains_down(one_decoder: ComposeStack) -> None:
    stack = one_decoder
    # the files, project and env file that brought the stack up: new replicas must match the old
    actuator = ComposeActuator([COMPOSE_FILE, HOSTNET_OVERRIDE], stack.project, [stack.env_file])
    before = asyncio.run(actuator.running())
    assert {before[s] for s in ("encoder", "dit", "decoder")} == {1}, before

    asyncio.run(actuator.apply({**before, "decoder": 2}))  # only the decoder changes
    assert stack.running("decoder") == 2
    assert stack.health("decoder") == ["healthy"] * 2  # apply returns once compose --wait saw them healthy
    assert asyncio.run(actuator.running()) == {**before, "decoder": 2}
    decoders = stack.nats_clients("decoder")
    assert len(decoders) == 2, decoders  # the new replica reached NATS on the stack's own port

    since = datetime.now(timezone.utc)
    batch = Batch(Settings(nats_url=stack.nats_url), specs_for("actuator drain", 24, steps=8), stage="decode")
    asyncio.run(batch.run(when_some_done=lambda: asyncio.run(actuator.apply({"decoder": 1}))))
    batch.assert_each_job_done_once()
    # drained, not cut off: no job decoded twice, as one redelivered from a killed replica would be
    assert set(batch.runs.values()) == {1}, batch.runs
    assert batch.workers == decoders, "the batch did not run on both decoders"

    assert stack.running("decoder") == 1
    assert len(stack.docker.compose.ps(services=["decoder"], all=True)) == 1  # the other is removed
    assert asyncio.run(actuator.running()) == before
    # the surplus replica finished what it held and exited on its own after SIGTERM
    assert stack.exit_codes("decoder", since, datetime.now(timezone.utc)) == ["0"]


def scheduler_status(stack: ComposeStack) -> dict | None:
    return json.loads(cli(stack, "status", "--json", *stack.options()))["scheduler"]


def stage_view(status: dict, stage: str) -> dict:
    return next(view for view in status["stages"] if view["stage"] == stage)


@pytest.fixture
def scheduler(one_decoder: ComposeStack, tmp_path: Path) -> Iterator[DockerClient]:
    """The scheduler service of the stack's project, with the compose actuator: up and healthy.
    The hybrid policy gives an idle stage its minimum (one), so only pins change the fleet here,
    and a released pin's surplus goes after 3 s of stabilisation."""
    settings = tmp_path / "scheduler.env"
    settings.write_text(
        f"DF_DOCKER_GID={DOCKER_SOCKET.stat().st_gid}\n"
        f"DF_SCHED_COMPOSE_FILES={COMPOSE_FILE.name},{HOSTNET_OVERRIDE.relative_to(COMPOSE_FILE.parent)}\n"
        "DF_SCHED_POLICY=hybrid\nDF_SCHED_POOL=slot:4\nDF_SCHED_TICK_S=1\nDF_SCHED_STABILISATION_S=3\n"
    )
    docker = DockerClient(
        compose_files=[COMPOSE_FILE, HOSTNET_OVERRIDE, SCHEDULER_OVERRIDE],
        compose_project_name=one_decoder.project,
        compose_env_files=[one_decoder.env_file, settings],
        compose_profiles=["scheduler"],
    )
    try:
        try:
            docker.compose.up(
                services=["scheduler"], detach=True, dependencies=False, wait=True, wait_timeout=120, pull="never",
                quiet=True,
            )
        except DockerException as exc:
            pytest.fail(f"the scheduler did not come up healthy: {exc}\n{docker.compose.logs(services=['scheduler'])}")
        yield docker
    finally:
        docker.compose.rm(services=["scheduler"], stop=True, volumes=False)


def test_scheduler_service_scales_the_project_through_compose(
    one_decoder: ComposeStack, scheduler: DockerClient
) -> None:
    stack = one_decoder
    assert [c.state.health.status for c in scheduler.compose.ps(services=["scheduler"])] == ["healthy"]
    with urllib.request.urlopen(f"{stack.nats_monitor_url}/connz?limit=1024", timeout=5) as answer:
        names = [c.get("name", "") for c in json.load(answer)["connections"]]
    assert "disagfusion-scheduler" in names

    wait_for("the scheduler publishes its view", lambda: scheduler_status(stack) is not None, timeout=30)
    status = scheduler_status(stack)
    assert (status["actuator"], status["policy"], status["pool"]) == ("compose", "hybrid", "slot:4")
    assert [(v["stage"], v["desired"], v["running"]) for v in status["stages"]] == [
        ("encode", 1, 1), ("denoise", 1, 1), ("decode", 1, 1)
    ], status  # it reads the running fleet through the engine
    assert status["last_error"] is None, status["last_error"]

    # a pin: the CLI writes it to the scheduler's bucket and leaves the scaling to the scheduler
    out = cli(stack, "scale", "decoder=2", *stack.options())
    assert "pinned {'decoder': 2}" in out and "compose actuator applies it" in out, out
    wait_for("the scheduler starts a second decoder", lambda: stack.health("decoder") == ["healthy"] * 2)
    containers = stack.docker.compose.ps(services=["decoder"])
    # the new replica was created by compose in the scheduler's container, from the mounted project
    made_by = sorted(c.config.labels["com.docker.compose.project.working_dir"] for c in containers)
    assert made_by == sorted([str(COMPOSE_FILE.parent), PROJECT_IN_CONTAINER]), made_by
    # with the stack's configuration (variables passed through): it reached the stack's NATS
    wait_for("both decoders are on NATS", lambda: len(stack.nats_clients("decoder")) == 2, timeout=30)
    wait_for("the scheduler reports the change", lambda: stage_view(scheduler_status(stack), "decode")["running"] == 2, timeout=30)
    status = scheduler_status(stack)
    assert stage_view(status, "decode")["desired"] == 2 and stage_view(status, "decode")["pinned"], status
    assert status["pins"] == {"decoder": 2} and status["last_error"] is None, status

    # released: the policy's own count (one) comes back, and the surplus decoder drains
    since = datetime.now(timezone.utc)
    cli(stack, "scale", "--release", "decoder", *stack.options())
    wait_for("the scheduler stops the pinned decoder", lambda: stack.running("decoder") == 1)
    assert stack.exit_codes("decoder", since, datetime.now(timezone.utc)) == ["0"]
    wait_for("the scheduler reports it", lambda: stage_view(scheduler_status(stack), "decode")["running"] == 1, timeout=30)
    status = scheduler_status(stack)
    assert stage_view(status, "decode")["desired"] == 1 and not stage_view(status, "decode")["pinned"], status
    assert status["pins"] == {} and status["last_error"] is None, status

    # stopped (SIGTERM), it exits cleanly and withdraws its status, so the CLI scales directly again
    since = datetime.now(timezone.utc)
    scheduler.compose.stop(services=["scheduler"])
    assert stack.exit_codes("scheduler", since, datetime.now(timezone.utc)) == ["0"]
    assert scheduler_status(stack) is None
