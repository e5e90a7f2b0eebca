"""Size and age limits of the streams that hold work and results (settings in ``BusSettings``),
and what each does when full:

- ``DF_WORK`` (tasks): discard policy ``new``. A full stream refuses a publish: a submission
  gets an error (the client's ``QueueFull``), a stage handing a job on retries later
  (``disagfusion.worker.failures``: the task is handed back with a delay). An accepted task is
  never dropped, which is also why DF_WORK has no age limit.
- ``DF_RESULTS``: discard policy ``old``: the oldest results go first, as they do by age.
- ``DF_OUTPUTS`` (large outputs, an object store): kept as long as results; a full bucket
  refuses a put and the decoder retries later, until older outputs expire.

Streams are created by whoever connects first (``disagfusion.bus``), with its settings. A
process that finds one with other limits updates it to those of its settings that were set
(in its environment, or by argument): a shell or a client with no ``DF_WORK_MAX_MSGS`` does not
reset what the services were started with. It never lowers DF_WORK's limits below what the
stream holds (JetStream would drop accepted tasks to fit): it says so and leaves them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StreamConfig, StreamState

from disagfusion.config import BusSettings

log = logging.getLogger(__name__)

LIMIT_FIELDS = ("max_msgs", "max_bytes", "max_age", "discard")
"""The stream settings this module owns; the others are left as the stream was created."""

SETTINGS = {
    "DF_WORK": {"work_max_msgs": "max_msgs", "work_max_bytes": "max_bytes"},
    "DF_RESULTS": {"results_max_msgs": "max_msgs", "results_max_bytes": "max_bytes", "results_max_age_s": "max_age"},
    "DF_DLQ": {"dlq_max_age_s": "max_age"},
    "OBJ_DF_OUTPUTS": {"outputs_max_bytes": "max_bytes", "results_max_age_s": "max_age"},
}
"""Per stream: the settings behind its limits (setting -> stream field)."""


def chosen(stream: str, settings: BusSettings) -> set[str]:
    """The limit fields of ``stream`` an existing stream is updated to: those whose setting was
    set, and the discard policy, which is the design's, not a setting."""
    return {"discard"} | {field for name, field in SETTINGS[stream].items() if name in settings.model_fields_set}


def _limit(value: int) -> int:
    """A setting's 0 ("no limit") as JetStream's -1."""
    return value or -1


def work(settings: BusSettings) -> dict[str, Any]:
    return {"max_msgs": _limit(settings.work_max_msgs), "max_bytes": _limit(settings.work_max_bytes),
            "discard": DiscardPolicy.NEW}


def results(settings: BusSettings) -> dict[str, Any]:
    return {"max_msgs": _limit(settings.results_max_msgs), "max_bytes": _limit(settings.results_max_bytes),
            "discard": DiscardPolicy.OLD}


def outputs(settings: BusSettings) -> dict[str, Any]:
    """``ObjectStoreConfig`` fields of DF_OUTPUTS."""
    return {"ttl": float(settings.results_max_age_s), "max_bytes": _limit(settings.outputs_max_bytes)}


def _normal(config: StreamConfig, field: str) -> Any:
    value = getattr(config, field)
    if field in ("max_msgs", "max_bytes"):
        return value if value and value > 0 else -1
    if field == "max_age":
        return float(value or 0.0)
    return value or DiscardPolicy.OLD


def _lowered_below_content(current: StreamConfig, changes: dict[str, Any], state: StreamState) -> str | None:
    """Why an update would drop tasks a stream that never discards accepted ones holds, or None."""
    if current.discard != DiscardPolicy.NEW:
        return None
    if 0 < changes.get("max_msgs", -1) < state.messages:
        return f"it holds {state.messages} tasks, more than max_msgs {changes['max_msgs']}"
    if 0 < changes.get("max_bytes", -1) < state.bytes:
        return f"it holds {state.bytes} bytes, more than max_bytes {changes['max_bytes']}"
    return None


async def apply(js: JetStreamContext, current: StreamConfig, state: StreamState, wanted: StreamConfig,
                settings: BusSettings) -> None:
    """Update an existing stream's limits to ``wanted``'s where they differ and were ``chosen``."""
    changes = {field: getattr(wanted, field) for field in LIMIT_FIELDS
               if field in chosen(current.name, settings) and getattr(wanted, field) is not None
               and _normal(wanted, field) != _normal(current, field)}
    if not changes:
        return
    why_not = _lowered_below_content(current, changes, state)
    if why_not:
        log.warning("stream %s keeps its limits (%s): lowering them would drop accepted work as %s; "
                    "lower them once it has drained", current.name, {f: getattr(current, f) for f in changes}, why_not)
        return
    try:
        await js.update_stream(dataclasses.replace(current, **changes))
    except Exception as exc:  # another process's limits stay; this one works with them
        log.warning("stream %s keeps its limits: updating them to %s failed: %s", current.name, changes, exc)
        return
    log.info("stream %s limits updated: %s", current.name, changes)
