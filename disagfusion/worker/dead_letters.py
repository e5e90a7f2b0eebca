"""The writer's side of the dead-letter stream ``DF_DLQ``: a task given up for a reason other
than a user's error is copied there, with why, by which worker and after how many deliveries,
before it is terminated, so an operator can look at it and replay it (``disagfusion dlq``).

It also remembers who took each task's latest delivery (KV bucket ``DF_ATTEMPTS``): a task
that runs out of deliveries was, each time, taken by a worker that never answered it (one
that died, was killed, or stalled without heartbeats), and its error result names the last.
"""

from __future__ import annotations

import logging
import time

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from disagfusion import bus
from disagfusion.protocol import (
    Attempt,
    DeadLetter,
    DecodeError,
    JobSpec,
    attempt_key,
    dlq_subject,
    pack,
    parse_work_subject,
    unpack,
)

log = logging.getLogger(__name__)


class DeadLetters:
    def __init__(self, js: JetStreamContext, attempts: KeyValue, stage: str, worker: str):
        self._js = js
        self._attempts = attempts
        self.stage = stage
        self.worker = worker

    async def taken(self, msg: Msg, spec: JobSpec) -> None:
        """Remember that this worker took this delivery. Best effort: a missing record only
        makes a later error result less precise."""
        await self._record(spec, Attempt(worker=self.worker, delivery=msg.metadata.num_delivered))

    async def failed(self, msg: Msg, spec: JobSpec, error: str) -> None:
        """Remember that this delivery failed with ``error`` and is left to be redelivered."""
        await self._record(spec, Attempt(worker=self.worker, delivery=msg.metadata.num_delivered, error=error))

    async def _record(self, spec: JobSpec, attempt: Attempt) -> None:
        try:
            await self._attempts.put(attempt_key(spec.job_id, self.stage), pack(attempt))
        except Exception as exc:
            log.debug("attempt of job %s not recorded: %s", spec.job_id, exc)

    async def last_unanswered(self, spec: JobSpec) -> str:
        """Why the previous delivery of a task that ran out of deliveries failed, in words."""
        try:
            entry = await self._attempts.get(attempt_key(spec.job_id, self.stage))
            attempt = unpack(Attempt, entry.value or b"")
        except (KeyNotFoundError, DecodeError):
            return "no worker recorded taking it, so none lived long enough to load its inputs"
        when = time.strftime("%H:%M:%S UTC", time.gmtime(attempt.t))
        if attempt.error:
            return f"delivery {attempt.delivery} was taken by {attempt.worker} at {when} and failed: {attempt.error}"
        return (f"delivery {attempt.delivery} was taken by {attempt.worker} at {when} and never answered "
                f"(that worker died, was killed, or stalled past DF_ACK_WAIT_S)")

    async def send(self, msg: Msg, job_id: str | None, reason: str) -> None:
        """Copy ``msg`` to the dead-letter stream. Raises if NATS cannot take it: the caller
        then leaves the task unterminated, to be redelivered and judged again."""
        model = (parse_work_subject(msg.subject) or ("", "unknown"))[1]
        letter = DeadLetter(job_id=job_id, stage=self.stage, model=model, subject=msg.subject, reason=reason,
                            deliveries=msg.metadata.num_delivered, worker=self.worker, task=msg.data)
        # One letter per stream message, however often a failed term makes it come back.
        msg_id = f"dlq:{msg.metadata.stream}:{msg.metadata.sequence.stream}"
        await bus.publish(self._js, dlq_subject(self.stage, model), pack(letter), msg_id)
        log.warning("job %s at %s dead-lettered: %s", job_id, self.stage, reason)
