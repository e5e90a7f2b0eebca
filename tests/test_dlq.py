"""``disagfusion dlq`` against a real nats-server and a stage worker that fails, then recovers."""

from __future__ import annotations

import asyncio

import pytest
from typer.testing import CliRunner

from disagfusion import dlq
from disagfusion.client import Client
from disagfusion.config import Settings
from disagfusion_cli import app
from tests.worker.conftest import Worker, run_worker, start_denoise_worker  # noqa: F401 (fixtures)
from tests.worker.test_stage_worker import (
    SlowModel,
    collect_outputs,
    specs,
    submit_denoise_tasks,
)

runner = CliRunner()


class FailingUntilFixed(SlowModel):
    def __init__(self):
        super().__init__(0.0)
        self.fixed = False

    def run(self, specs, inputs, on_step=None):
        if not self.fixed:
            raise RuntimeError("driver crashed")
        return super().run(specs, inputs, on_step)


def said(result) -> str:
    return " ".join(result.output.split())


async def test_list_show_replay_and_purge(run_worker: Worker, nats_server: str, role_url, monkeypatch: pytest.MonkeyPatch) -> None:
    admin = role_url(nats_server, "admin")  # dead letters are the operator's: listing, replay and purge
    monkeypatch.setenv("DF_NATS_URL", admin)
    jobs = specs(3)
    stack = await submit_denoise_tasks(admin, jobs)
    model = await run_worker(FailingUntilFixed())
    async with Client(Settings(nats_url=nats_server)) as client:
        for job in jobs:
            assert (await client.result(job.job_id, timeout=20)).error == "stage denoise failed: RuntimeError: driver crashed"
    kept = {k.letter.job_id: k.seq for k in await dlq.letters(stack.js)}
    seqs = [kept[job.job_id] for job in jobs]

    listed = await asyncio.to_thread(runner.invoke, app, ["dlq", "list", "--stage", "denoise"])
    assert listed.exit_code == 0, listed.output
    for job in jobs:
        assert job.job_id[:8] in listed.output
    shown = await asyncio.to_thread(runner.invoke, app, ["dlq", "show", str(seqs[0])])
    assert shown.exit_code == 0, shown.output
    assert f"job_id: {jobs[0].job_id}" in said(shown) and "reason: stage denoise failed: RuntimeError: driver crashed" in said(shown)
    assert "deliveries: 1" in said(shown) and "replays so far: 0" in said(shown)

    model.fixed = True
    replayed = await asyncio.to_thread(runner.invoke, app, ["dlq", "replay", str(seqs[0]), str(seqs[1])])
    assert replayed.exit_code == 0, replayed.output
    outputs = await collect_outputs(stack, 2, timeout=20)
    assert sorted(o.job.job_id for _, o in outputs) == sorted(j.job_id for j in jobs[:2])
    assert {o.replay for _, o in outputs} == {1}
    async with Client(Settings(nats_url=nats_server)) as client:
        with pytest.raises(TimeoutError):  # the error result was replaced (here: by the decoder's, to come)
            await client.result(jobs[0].job_id, timeout=1)
    left = [k.seq for k in await dlq.letters(stack.js)]
    assert seqs[0] not in left and seqs[1] not in left and seqs[2] in left

    missing = await asyncio.to_thread(runner.invoke, app, ["dlq", "show", str(seqs[0])])
    assert missing.exit_code == 1 and f"no dead letter {seqs[0]}" in said(missing)
    purged = await asyncio.to_thread(runner.invoke, app, ["dlq", "purge", "--all"])
    assert purged.exit_code == 0 and "purged" in said(purged)
    assert await dlq.letters(stack.js) == []
    await stack.close()
