"""``disagfusion dlq``: the tasks the stages gave up for a reason other than a user's error
(the dead-letter stream ``DF_DLQ``), to list, show, replay and purge."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.table import Table

from disagfusion import bus, dlq
from disagfusion.protocol import DecodeError, StageTask, unpack
from disagfusion_cli.common import DEFAULT_DATA_DIR, DataDir, client_settings, console, fail

app = typer.Typer(help="Tasks given up for a reason other than a user's error: list, show, replay, purge.",
                  no_args_is_help=True)

T = TypeVar("T")
Seqs = Annotated[list[int] | None, typer.Argument(help="Dead-letter numbers, as `dlq list` shows them.")]
AllOf = Annotated[bool, typer.Option("--all", help="Every dead letter kept.")]


def _with_js(data_dir, action: Callable[..., Awaitable[T]]) -> T:
    async def run() -> T:
        connected = await bus.connect(client_settings(data_dir), "disagfusion-dlq")
        try:
            return await action(connected.js)
        finally:
            await connected.close()

    try:
        return asyncio.run(run())
    except dlq.DlqError as exc:
        fail(str(exc))


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@app.command("list")
def list_letters(
    stage: Annotated[str | None, typer.Option(help="Only this stage's: encode, denoise or decode.")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """The dead letters kept, oldest first."""
    found = _with_js(data_dir, lambda js: dlq.letters(js, stage))
    if not found:
        console.print("no dead letters")
        return
    table = Table("#", "when", "job", "stage", "model", "deliveries", "reason")
    for kept in found:
        letter = kept.letter
        table.add_row(str(kept.seq), _when(letter.t), letter.job_id or "?", letter.stage, letter.model or "?",
                      str(letter.deliveries), letter.reason)
    console.print(table)


@app.command()
def show(seq: Annotated[int, typer.Argument(help="The dead letter's number.")],
         data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """One dead letter in full: why it was given up, where, and its job's spec."""
    kept = _with_js(data_dir, lambda js: dlq.letter(js, seq))
    letter = kept.letter
    console.print(f"dead letter {kept.seq}, {_when(letter.t)}")
    for name in ("job_id", "stage", "model", "subject", "deliveries", "worker", "reason"):
        console.print(f"  {name}: {getattr(letter, name)}")
    try:
        task = unpack(StageTask, letter.task)
    except DecodeError as exc:
        console.print(f"  task: unreadable ({exc})")
        return
    console.print(f"  replays so far: {task.replay}")
    console.print(f"  inputs: {', '.join(f'{n} {r.dtype}{r.shape} via {r.transport}' for n, r in task.tensors.items())}")
    console.print(f"  job: {task.job.model_dump_json()}")


@app.command()
def replay(seqs: Seqs = None, all_of: AllOf = False, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Queue dead letters' tasks again at the stage that gave them up (their inputs must still
    be in the transport). The job's error result is replaced by the replay's."""
    if not seqs and not all_of:
        fail("name the dead letters to replay, or give --all")

    async def run(js) -> list[str]:
        chosen = seqs or [kept.seq for kept in await dlq.letters(js)]
        return [await dlq.replay(js, seq) for seq in chosen]

    for job_id in _with_js(data_dir, run):
        console.print(f"replayed job {job_id}")


@app.command()
def purge(seqs: Seqs = None, all_of: AllOf = False, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Delete dead letters for good."""
    if not seqs and not all_of:
        fail("name the dead letters to purge, or give --all")
    gone = _with_js(data_dir, lambda js: dlq.purge(js, seqs or None))
    console.print(f"purged {gone} dead letter(s)")
