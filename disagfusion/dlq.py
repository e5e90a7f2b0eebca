"""The operator's side of the dead-letter stream ``DF_DLQ`` (``disagfusion dlq``): list the
tasks given up, show one, replay them, purge them. Stage workers write it
(``disagfusion.worker.dead_letters``).

A replay publishes the task again, as it was delivered, to the stage that gave it up, with
``StageTask.replay`` raised by one: its message ids then differ from those of the failed run,
which JetStream remembers for its duplicate window. The job's error result is purged first,
so a client waiting for the job gets the replay's result; the letter is deleted once the task
is queued again.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from disagfusion import bus
from disagfusion.errors import DisagFusionError
from disagfusion.protocol import (
    DLQ_STREAM,
    RESULTS_STREAM,
    DeadLetter,
    DecodeError,
    StageTask,
    pack,
    results_subject,
    task_msg_id,
    unpack,
)


class DlqError(DisagFusionError, LookupError):
    """A dead letter that is not there, or cannot be replayed."""


@dataclass(frozen=True)
class Letter:
    seq: int
    """Its sequence number in ``DF_DLQ``: how the commands name it."""
    letter: DeadLetter


async def letters(js: JetStreamContext, stage: str | None = None) -> list[Letter]:
    """Every dead letter kept, oldest first (of ``stage`` only, if given)."""
    found = []
    seq = (await js.stream_info(DLQ_STREAM)).state.first_seq
    while True:
        try:  # the first letter at or after seq: replayed and purged ones leave gaps
            raw = await js.get_msg(DLQ_STREAM, seq, next=True)
        except NotFoundError:
            return found
        kept = Letter(raw.seq, unpack(DeadLetter, raw.data))
        if stage is None or kept.letter.stage == stage:
            found.append(kept)
        seq = raw.seq + 1


async def letter(js: JetStreamContext, seq: int) -> Letter:
    try:
        raw = await js.get_msg(DLQ_STREAM, seq)
    except NotFoundError:
        raise DlqError(f"no dead letter {seq} in {DLQ_STREAM}") from None
    return Letter(seq, unpack(DeadLetter, raw.data))


async def replay(js: JetStreamContext, seq: int) -> str:
    """Queue dead letter ``seq``'s task again at its stage; its job id."""
    kept = await letter(js, seq)
    try:
        task = unpack(StageTask, kept.letter.task)
    except DecodeError as exc:
        raise DlqError(f"dead letter {seq} cannot be replayed: its task is not readable ({exc})") from None
    again = task.model_copy(update={"replay": task.replay + 1})
    job_id = task.job.job_id
    await js.purge_stream(RESULTS_STREAM, subject=results_subject(job_id))
    await bus.publish(js, kept.letter.subject, pack(again), task_msg_id(job_id, task.stage, again.replay))
    await js.delete_msg(DLQ_STREAM, seq)
    return job_id


async def purge(js: JetStreamContext, seqs: list[int] | None = None) -> int:
    """Delete dead letters ``seqs`` (all of them when None); how many went."""
    if seqs is None:
        gone = (await js.stream_info(DLQ_STREAM)).state.messages
        await js.purge_stream(DLQ_STREAM)
        return gone
    for seq in seqs:
        await letter(js, seq)  # a clear error for a letter that is not there
        await js.delete_msg(DLQ_STREAM, seq)
    return len(seqs)
