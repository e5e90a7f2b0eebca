"""Which answer each failure gets: reject (the user's error), dead letter (the task's), retry (the world's)."""

from __future__ import annotations

import errno

import nats.errors
import nats.js.errors
import pytest
import redis.exceptions

from disagfusion.limits import LimitError
from disagfusion.models.base import SpecError
from disagfusion.protocol import DecodeError
from disagfusion.worker.failures import Outcome, classify, describe, retry_delay


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (SpecError("steps", "too many"), Outcome.REJECT),
        (LimitError("deadline_s", "passed its deadline"), Outcome.REJECT),
        (nats.js.errors.APIError(code=400, err_code=10077, description="maximum messages exceeded"), Outcome.RETRY),
        (DecodeError("bad steps", job_id="j", field="job.steps"), Outcome.REJECT),
        (DecodeError("lying shape", job_id="j", field="tensors.embeds"), Outcome.DEAD),
        (DecodeError("garbage"), Outcome.DEAD),
        (RuntimeError("a bug"), Outcome.DEAD),
        (nats.errors.MaxPayloadError(), Outcome.DEAD),  # the output can never fit
        (redis.exceptions.ConnectionError("refused"), Outcome.RETRY),
        (redis.exceptions.BusyLoadingError("loading"), Outcome.RETRY),
        (redis.exceptions.OutOfMemoryError("OOM"), Outcome.RETRY),
        (nats.errors.TimeoutError(), Outcome.RETRY),
        (nats.js.errors.ServiceUnavailableError(), Outcome.RETRY),
        (nats.js.errors.NoStreamResponseError(), Outcome.RETRY),
        (OSError(errno.ENOSPC, "No space left on device"), Outcome.RETRY),
        (PermissionError(errno.EACCES, "denied"), Outcome.DEAD),
    ],
)
def test_classify(exc: BaseException, outcome: Outcome) -> None:
    assert classify(exc) is outcome


def test_retry_delay_doubles_up_to_its_ceiling() -> None:
    assert [retry_delay(n, 1.0, 30.0) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert retry_delay(10_000, 1.0, 30.0) == 30.0


def test_describe_names_the_type_when_the_message_says_nothing() -> None:
    assert describe(RuntimeError()) == "RuntimeError"
    assert describe(RuntimeError("boom")) == "RuntimeError: boom"
