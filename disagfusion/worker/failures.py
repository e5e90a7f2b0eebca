"""How a stage worker answers a failure while it admits, computes or sends a task.

Every failure ends in exactly one of three ways, chosen here from the exception alone:

- ``REJECT``: the user asked for something that cannot be done (an invalid spec, a size the
  model refuses, a job over a limit or past its deadline: ``disagfusion.limits``). The job
  gets an error result naming the field and the task is terminated.
- ``DEAD``: the task cannot be done for another reason (a corrupted or lying tensor ref, a
  missing input, a model that crashed, an output too big for NATS, a bug). The job gets an
  error result saying the cause, the task is terminated and copied to the dead-letter stream,
  from where an operator can replay it.
- ``RETRY``: the world is briefly broken (Redis or NATS unreachable, out of memory or disk, a
  stream at its limit): the task goes back to the queue with a growing delay, and the retry
  does not count as a failed delivery.

Anything the worker's own loops raise outside these answers is a bug: the worker crashes, and
its supervisor sees it (``StageWorker.run``).
"""

from __future__ import annotations

import errno
from enum import StrEnum

import nats.errors
import nats.js.errors
import redis.exceptions

from disagfusion.limits import LimitError, stream_full
from disagfusion.models.base import SpecError
from disagfusion.protocol import DecodeError


class Outcome(StrEnum):
    REJECT = "reject"
    DEAD = "dead"
    RETRY = "retry"


TRANSIENT: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,  # nats.errors.TimeoutError and asyncio's too
    redis.exceptions.ConnectionError,  # BusyLoadingError (a restarting Redis) included
    redis.exceptions.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,  # a replica promoted while we wrote
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.NoRespondersError,  # JetStream not up yet
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,  # a stream electing its leader in a cluster
)
"""Failures of the world around the worker, not of the task: they pass when it recovers."""

_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.ENOMEM, errno.EAGAIN, errno.EMFILE, errno.ENFILE}
"""A full /dev/shm or memory, too many open files: the task is fine, try again later."""


def classify(exc: BaseException) -> Outcome:
    if isinstance(exc, (SpecError, LimitError)):
        return Outcome.REJECT
    if isinstance(exc, DecodeError):
        # A spec field the user set is the user's to fix; anything else (a lying tensor ref,
        # an unknown dtype, garbage) came from a broken producer and is worth a dead letter.
        return Outcome.REJECT if exc.field and exc.field.startswith("job.") else Outcome.DEAD
    if isinstance(exc, TRANSIENT) or (isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS):
        return Outcome.RETRY
    if stream_full(exc):  # DF_WORK or DF_OUTPUTS at its limit: room comes as other jobs finish
        return Outcome.RETRY
    return Outcome.DEAD


def never_fits(exc: BaseException) -> bool:
    """The output can never be sent as it is (larger than NATS's max payload): sending it again
    would fail the same way."""
    return isinstance(exc, nats.errors.MaxPayloadError)


def retry_delay(deliveries: int, base_s: float, most_s: float) -> float:
    """Delay before the ``deliveries``-th delivery of a task is retried: doubles each time
    from ``base_s``, at most ``most_s``, so an outage costs a few cheap retries per task
    rather than a hot loop."""
    return min(most_s, base_s * 2 ** max(0, min(deliveries - 1, 30)))


def describe(exc: BaseException) -> str:
    """An exception in words for an error result: its type when the message alone is unclear."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
