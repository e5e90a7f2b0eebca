"""The whole deployment in containers (compose.yaml + the hostnet override, the tiny model only),
driven from the host the way a user does it: jobs through the `disagfusion` CLI and client with
DF_NATS_URL pointing at the stack, replicas through `disagfusion scale`.

One stack serves the module, so the tests run in file order and each leaves it consistent for
the next: up (images equal to the embedded launcher's) -> dit=3 -> dit=1 under load -> dit
killed and brought back. Only the config test needs no stack.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from compose_support import COMPOSE_FILE, HOSTNET_OVERRIDE, ComposeStack, compose_client, compose_up
from disagfusion.cli import app
from disagfusion.client import Client
from disagfusion.config import Settings
from disagfusion.bus import consumer_name
from disagfusion.launcher import Launcher, load_services
from disagfusion.protocol import RESULTS_STREAM, JobSpec, Result, TimingSample, metrics_subject, results_subject, unpack

SERVICES = ["nats", "redis", "encoder", "dit", "decoder"]
ACK_WAIT_S = 10
"""Short, so tasks a killed worker held come back soon (compose.yaml passes DF_ACK_WAIT_S on)."""

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def stack(project_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    with compose_up(
        tmp_path_factory.mktemp("compose"),
        env={"DF_MODELS": "tiny", "DF_ACK_WAIT_S": str(ACK_WAIT_S)},
        wait_timeout=300,
    ) as stack:
        yield stack


def cli(stack: ComposeStack, *args: str) -> str:
    """Run `disagfusion ARGS` in-process against the stack; fails the test on a non-zero exit."""
    result = CliRunner().invoke(app, list(args), env={"DF_NATS_URL": stack.nats_url}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def compose_options(stack: ComposeStack) -> list[str]:
    return ["-f", str(COMPOSE_FILE), "-f", str(HOSTNET_OVERRIDE), "-p", stack.project, "--env-file", str(stack.env_file)]


def running_dit(stack: ComposeStack) -> int:
    return sum(c.state.running for c in stack.docker.compose.ps(services=["dit"], all=True))


def nats_clients(stack: ComposeStack, service: str) -> set[str]:
    """Names of the NATS connections of a service's workers (`dit@host:pid:rand`), from /connz."""
    with urllib.request.urlopen(f"{stack.nats_monitor_url}/connz?limit=1024", timeout=5) as answer:
        connections = json.load(answer)["connections"]
    return {c["name"] for c in connections if c.get("name", "").startswith(f"{service}@")}


def dit_tasks_held(stack: ComposeStack) -> int:
    """Denoise tasks delivered and not yet acked, from the monitoring endpoint /jsz."""
    with urllib.request.urlopen(f"{stack.nats_monitor_url}/jsz?consumers=true", timeout=5) as answer:
        accounts = json.load(answer)["account_details"]
    return sum(
        consumer["num_ack_pending"]
        for account in accounts
        for stream in account.get("stream_detail", [])
        for consumer in stream.get("consumer_detail", [])
        if consumer["name"] == consumer_name("denoise", "tiny")
    )


def specs_for(label: str, count: int, steps: int) -> list[JobSpec]:
    return [JobSpec(prompt=f"{label} {i}", seed=i, steps=steps, width=64, height=64) for i in range(count)]


class Batch:
    """Runs jobs through a Client and records who denoised what (df.metrics.denoise samples)."""

    def __init__(self, settings: Settings, specs: list[JobSpec]):
        self.settings = settings
        self.specs = specs
        self.results: list[Result] = []
        self.denoised: Counter[str] = Counter()
        """How many times each job was denoised."""
        self.dit_workers: set[str] = set()
        self.result_counts: dict[str, int] = {}
        """Result messages per job in the DF_RESULTS stream."""

    async def run(self, when_some_done=None, after: int = 3) -> None:
        """Submit every job and wait for all results; `when_some_done()` (blocking, run in a
        thread while results keep coming) is called once `after` results are in."""
        async with Client(self.settings) as client:

            async def seen(msg) -> None:
                sample = unpack(TimingSample, msg.data)
                self.dit_workers.add(sample.worker)
                self.denoised.update(job.job_id for job in sample.jobs)

            await client._bus.nc.subscribe(metrics_subject("denoise"), cb=seen)
            action = None
            async for result in client.run_many(self.specs, timeout=180):
                self.results.append(result)
                if when_some_done is not None and action is None and len(self.results) >= after:
                    action = asyncio.create_task(asyncio.to_thread(when_some_done))
            if action is not None:
                await action
            await client._bus.nc.flush()
            info = await client._js.stream_info(RESULTS_STREAM, subjects_filter="df.results.>")
        self.result_counts = {spec.job_id: info.state.subjects.get(results_subject(spec.job_id), 0) for spec in self.specs}

    def assert_each_job_done_once(self) -> None:
        failed = [(r.job_id, r.error) for r in self.results if r.status != "ok"]
        assert not failed, failed
        assert sorted(r.job_id for r in self.results) == sorted(s.job_id for s in self.specs)
        # exactly one result message per job in DF_RESULTS: nothing lost, nothing doubled
        assert set(self.result_counts.values()) == {1}, self.result_counts


async def images_from(settings: Settings, specs: list[JobSpec]) -> dict[str, np.ndarray]:
    images = {}
    async with Client(settings) as client:
        async for result in client.run_many(specs, timeout=180):
            assert result.status == "ok", result.error
            images[result.job_id] = np.asarray(Image.open(io.BytesIO(await client.output(result))))
    return images


def test_stack_serves_cli_jobs_identical_to_the_embedded_launcher(
    stack: ComposeStack, tmp_path: Path, tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for service in SERVICES:
        assert stack.health(service) == ["healthy"], service
    specs = [
        JobSpec(prompt=f"a container test image {i}", seed=200 + i, steps=steps, width=w, height=h, guidance=g)
        for i, (w, h, steps, g) in enumerate([(64, 64, 4, 4.5), (96, 64, 3, 1.0), (64, 128, 5, 7.0)])
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(spec.model_dump_json() + "\n" for spec in specs))
    out = tmp_path / "out"
    cli(stack, "submit", str(jobs), "--out", str(out), "--timeout", "300")
    manifest = json.loads((out / "manifest.json").read_text())["jobs"]
    assert [entry["status"] for entry in manifest] == ["ok"] * len(specs), manifest
    from_compose = {entry["job_id"]: np.asarray(Image.open(out / entry["file"])) for entry in manifest}

    # the reference: the same specs through the embedded stack (local processes, same compose.yaml)
    monkeypatch.setenv("DF_MODELS", "tiny")
    launcher = Launcher(tmp_path / "embedded", models_dir=tiny_models_dir)
    try:
        launcher.up()
        from_launcher = asyncio.run(images_from(launcher.client_settings(), specs))
    finally:
        launcher.down(timeout=20)
    for spec in specs:
        got, expected = from_compose[spec.job_id], from_launcher[spec.job_id]
        assert got.shape == (spec.height, spec.width, 3)
        assert np.array_equal(got, expected), f"{spec.width}x{spec.height}: {np.count_nonzero(got != expected)} differ"


def test_scale_dit_to_three_spreads_a_batch(stack: ComposeStack) -> None:
    cli(stack, "scale", "dit=3", *compose_options(stack))
    assert running_dit(stack) == 3
    assert stack.health("dit") == ["healthy"] * 3
    clients = nats_clients(stack, "dit")
    assert len(clients) == 3, clients

    batch = Batch(Settings(nats_url=stack.nats_url), specs_for("three dits", 30, steps=2))
    asyncio.run(batch.run())
    batch.assert_each_job_done_once()
    # every container's worker took tasks from the dit consumer, and only they did
    assert batch.dit_workers == clients

    status = cli(stack, "status", *compose_options(stack))
    assert "compose deployment" in status and "denoise" in status


def test_scale_down_under_load_drains_the_surplus(stack: ComposeStack) -> None:
    cli(stack, "scale", "dit=3", *compose_options(stack))  # whatever the tests before left
    before = nats_clients(stack, "dit")
    assert len(before) == 3, before
    since = datetime.now(timezone.utc)

    batch = Batch(Settings(nats_url=stack.nats_url), specs_for("scale down", 30, steps=12))
    asyncio.run(batch.run(when_some_done=lambda: cli(stack, "scale", "dit=1", *compose_options(stack))))
    batch.assert_each_job_done_once()
    # drained, not cut off: no job was denoised twice, as one redelivered from a killed replica would be
    assert set(batch.denoised.values()) == {1}, batch.denoised
    assert len(before & batch.dit_workers) >= 2, "the batch ran on fewer than two replicas"

    assert running_dit(stack) == 1
    assert len(stack.docker.compose.ps(services=["dit"], all=True)) == 1  # the others are removed
    assert len(nats_clients(stack, "dit")) == 1
    # both surplus containers exited on their own after SIGTERM (code 0), not killed at the grace period
    exits = [
        event.actor.attributes.get("exitCode")
        for event in stack.docker.system.events(
            since=since,
            until=datetime.now(timezone.utc),
            filters={"label": f"com.docker.compose.project={stack.project}", "event": "die"},
        )
        if event.actor.attributes.get("com.docker.compose.service") == "dit"
    ]
    assert exits == ["0", "0"], exits


def test_killed_dit_comes_back_and_the_batch_completes(stack: ComposeStack) -> None:
    before = nats_clients(stack, "dit")
    held_at_kill: list[int] = []

    def kill_and_restart() -> None:
        deadline = time.monotonic() + 30
        while dit_tasks_held(stack) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stack.docker.compose.kill(services=["dit"])
        held_at_kill.append(dit_tasks_held(stack))
        stack.docker.compose.up(services=["dit"], detach=True, wait=True, wait_timeout=300, pull="never", quiet=True)

    batch = Batch(Settings(nats_url=stack.nats_url), specs_for("killed", 20, steps=12))
    asyncio.run(batch.run(when_some_done=kill_and_restart))
    # the killed worker held tasks it never acked: they came back only through redelivery
    assert held_at_kill[0] > 0
    batch.assert_each_job_done_once()
    after = nats_clients(stack, "dit")
    assert after and not (after & before), "dit was not restarted"
    assert after & batch.dit_workers, "the restarted dit did none of the batch"


def test_embedded_launcher_runs_what_compose_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Service by service, `docker compose config` and the launcher's reading of compose.yaml
    agree on command and environment, with the same variables set."""
    for key, value in {"DF_MODELS": "tiny", "DF_ACK_WAIT_S": "7", "DF_DTYPE": "bfloat16"}.items():
        monkeypatch.setenv(key, value)  # compose reads them from its environment, the launcher too
    config = compose_client().compose.config(return_json=True)["services"]
    launcher = load_services()
    assert set(config) == set(launcher) | {"nats", "redis"}
    for name, service in launcher.items():
        assert config[name]["command"] == service.command, name
        assert config[name]["environment"] == service.environment, name
    assert launcher["dit"].environment["DF_ACK_WAIT_S"] == "7"
