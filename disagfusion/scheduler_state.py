"""Where the elastic scheduler's view and an operator's pins live: the JetStream KV bucket
``DF_SCHEDULER``, so the CLI (and any NATS client) reads and writes them without importing the
scheduler service. The records themselves are ``disagfusion.protocol.SchedulerStatus`` (JSON
under key ``status``) and a JSON map of service → replicas (key ``pins``)."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue
from pydantic import TypeAdapter

from disagfusion.protocol import SCHEDULER_BUCKET, SCHEDULER_PINS_KEY, SCHEDULER_STATUS_KEY, SchedulerStatus

_PINS = TypeAdapter(dict[str, int])


async def scheduler_bucket(js: JetStreamContext, create: bool = False) -> KeyValue | None:
    try:
        return await js.key_value(SCHEDULER_BUCKET)
    except BucketNotFoundError:
        if not create:
            return None
        return await js.create_key_value(bucket=SCHEDULER_BUCKET, history=1)


async def read_status(js: JetStreamContext) -> SchedulerStatus | None:
    kv = await scheduler_bucket(js)
    if kv is None:
        return None
    try:
        entry = await kv.get(SCHEDULER_STATUS_KEY)
    except KeyNotFoundError:
        return None
    return SchedulerStatus.model_validate_json(entry.value) if entry.value else None


async def write_status(kv: KeyValue, status: SchedulerStatus) -> None:
    await kv.put(SCHEDULER_STATUS_KEY, status.model_dump_json().encode())


async def withdraw_status(kv: KeyValue) -> None:
    """A scheduler that stops says so: ``disagfusion scale`` must not pin for one that is gone."""
    await kv.delete(SCHEDULER_STATUS_KEY)


async def read_pins(kv: KeyValue) -> dict[str, int]:
    try:
        entry = await kv.get(SCHEDULER_PINS_KEY)
    except (KeyNotFoundError, NoKeysError):
        return {}
    return _PINS.validate_json(entry.value or b"{}")


async def update_pins(js: JetStreamContext, pin: dict[str, int], release: list[str] | None) -> dict[str, int]:
    """Add ``pin`` and drop the services in ``release`` (all pins when it is empty; none when
    None); returns the pins now in force."""
    kv = await scheduler_bucket(js, create=True)
    pins = await read_pins(kv)
    if release is not None:
        pins = {k: v for k, v in pins.items() if release and k not in release}
    pins.update(pin)
    await kv.put(SCHEDULER_PINS_KEY, _PINS.dump_json(pins))
    return pins
