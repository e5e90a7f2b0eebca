"""The whole deployment in containers (compose.yaml + the hostnet override, the tiny model only),
driven from the host the way a user does it: jobs through the `disagfusion` CLI and client with
DF_NATS_URL pointing at the stack, replicas through `disagfusion scale`.

One stack (the session's `stack` fixture) serves the module, so the tests run in file order and
each leaves it consistent for the next: up (images equal to the embedded launcher's) -> dit=3 ->
dit=1 under load -> dit killed and brought back. Only the config test needs no stack.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compose_support import Batch, ComposeStack, cli, compose_client, specs_for
from disagfusion.protocol import consumer_name
from disagfusion.client import Client
from disagfusion.config import Settings
from disagfusion.launcher import Launcher, load_services
from disagfusion.protocol import JobSpec

SERVICES = ["nats", "redis", "encoder", "dit", "decoder", "gateway"]

pytestmark = pytest.mark.timeout(600)


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
    cli(stack, "scale", "dit=3", *stack.options())
    assert stack.running("dit") == 3
    assert stack.health("dit") == ["healthy"] * 3
    clients = stack.nats_clients("dit")
    assert len(clients) == 3, clients

    batch = Batch(Settings(nats_url=stack.nats_url), specs_for("three dits", 30, steps=2))
    asyncio.run(batch.run())
    batch.assert_each_job_done_once()
    # every container's worker took tasks from the dit consumer, and only they did
    assert batch.workers == clients

    status = cli(stack, "status", *stack.options())
    assert "compose deployment" in status and "denoise" in status


def test_scale_down_under_load_drains_the_surplus(stack: ComposeStack) -> None:
    cli(stack, "scale", "dit=3", *stack.options())  # whatever the tests before left
    before = stack.nats_clients("dit")
    assert len(before) == 3, before
    since = datetime.now(timezone.utc)

    batch = Batch(Settings(nats_url=stack.nats_url), specs_for("scale down", 30, steps=12))
    asyncio.run(batch.run(when_some_done=lambda: cli(stack, "scale", "dit=1", *stack.options())))
    batch.assert_each_job_done_once()
    # drained, not cut off: no job was denoised twice, as one redelivered from a killed replica would be
    assert set(batch.runs.values()) == {1}, batch.runs
    assert len(before & batch.workers) >= 2, "the batch ran on fewer than two replicas"

    assert stack.running("dit") == 1
    assert len(stack.docker.compose.ps(services=["dit"], all=True)) == 1  # the others are removed
    assert len(stack.nats_clients("dit")) == 1
    # both surplus containers exited on their own after SIGTERM (code 0), not killed at the grace period
    exits = stack.exit_codes("dit", since, datetime.now(timezone.utc))
    assert exits == ["0", "0"], exits


def test_killed_dit_comes_back_and_the_batch_completes(stack: ComposeStack) -> None:
    before = stack.nats_clients("dit")
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
    after = stack.nats_clients("dit")
    assert after and not (after & before), "dit was not restarted"
    assert after & batch.workers, "the restarted dit did none of the batch"


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
