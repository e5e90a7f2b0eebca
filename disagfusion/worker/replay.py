"""Replay of a job whose input vanished: the job is sent back to its first stage.

A consumer that finds an input tensor gone (Redis restarted without it or evicted it, its
TTL ran out, an shm slot file was removed) cannot compute, and the task that produced the
tensor was acked long ago. The job itself is not bad, so rather than failing it, the consumer
publishes the job's first-stage task again and terminates its own. The first-stage task is
the job spec alone (no tensors), so any consumer can rebuild it from its own task; the
producing stage's task could not be rebuilt in general, because its own inputs were freed
once it acked (the decoder's input came from the dit, whose input came from the encoder).
The models are seeded, so the re-run makes the same pixels.

The re-run is ``StageTask.replay`` + 1, so its message ids (``task_msg_id``) differ from the
vanished run's, which JetStream remembers for its duplicate window; and the number is derived
from the task, so two consumers (or a redelivery) replaying the same run publish the same id
and the first stage gets one task. Replays are bounded by ``Settings.max_input_replays``
(``StageTask.input_replays`` counts them); past that, the job gets an error result that says
its input kept vanishing. The job's result keeps the id of the run the replays started from
(``result_run``), so the job has one result whichever run finishes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from disagfusion import bus
from disagfusion.errors import DisagFusionError
from disagfusion.protocol import STAGES, MissingBlobError, Stage, StageTask, pack, task_msg_id, work_subject

log = logging.getLogger(__name__)

EventSender = Callable[..., Awaitable[None]]


class InputKeptVanishing(DisagFusionError, LookupError):
    """A job's input vanished again after as many replays as allowed."""


def input_gone(exc: BaseException, task: StageTask | None) -> bool:
    """``task`` could not load an input tensor because it no longer exists (not because it is
    malformed): the job is worth running again from its first stage."""
    return task is not None and bool(task.tensors) and isinstance(exc, MissingBlobError)


def first_stage_task(task: StageTask) -> StageTask:
    """The task that starts the job's next run: its spec at the first stage, its submission
    time kept (so latency is counted from the client's submit), the replay counted."""
    return StageTask(job=task.job, stage=STAGES[0], submitted_at=task.submitted_at, replay=task.replay + 1,
                     input_replays=task.input_replays + 1)


def result_run(task: StageTask) -> int:
    """The replay number in the message id of ``task``'s job's result: operator replays only.
    Every run that input replays started shares it, so should a run whose input vanished for
    one consumer still be finished by another (a duplicated task), the job keeps one result."""
    return task.replay - task.input_replays


class Replays:
    """Sends the jobs whose input vanished back to their first stage, for one stage worker."""

    def __init__(self, js: JetStreamContext, stage: Stage, limit: int, publish_event: EventSender):
        self.js = js
        self.stage = stage
        self.limit = limit
        self.publish_event = publish_event
        self.count = 0
        """Jobs this worker sent back (for logs and tests)."""

    async def send_back(self, msg: Msg, task: StageTask, gone: MissingBlobError) -> Exception | None:
        """Replay ``task``'s job from its first stage and terminate ``msg``: None when done. Else
        the failure to answer instead: ``InputKeptVanishing`` past the limit, or the error of a
        publish that failed (NATS briefly away: retried later, as any other send)."""
        job_id = task.job.job_id
        if task.input_replays >= self.limit:
            return InputKeptVanishing(
                f"input of stage {self.stage} kept vanishing: the job was replayed {task.input_replays} time(s) "
                f"(max_input_replays), and its input is gone again: {gone}")
        again = first_stage_task(task)
        try:
            await bus.publish(self.js, work_subject(again.stage, again.job.model), pack(again),
                              task_msg_id(job_id, again.stage, again.replay))
        except Exception as exc:
            return exc
        self.count += 1
        log.warning("job %s: input of stage %s vanished (%s); replayed from stage %s (replay %d of at most %d)",
                    job_id, self.stage, gone, again.stage, again.input_replays, self.limit)
        await self.publish_event(job_id, "replayed")
        try:
            await msg.term()
        except Exception as exc:  # redelivered after AckWait: its replay has the same id, stored once
            log.warning("job %s: could not terminate the task whose input vanished: %s", job_id, exc)
        return None
