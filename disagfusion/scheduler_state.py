"""What the elastic scheduler publishes about itself, and the pins an operator sets: both live
in the JetStream KV bucket ``DF_SCHEDULER``, so the CLI (and any NATS client) reads and writes
them without importing the scheduler service."""

from __future__ import annotations

import json
import time

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

SCHEDULER_BUCKET = "DF_SCHEDULER"
STATUS_KEY = "status"
PINS_KEY = "pins"


class StageState(BaseModel):
    stage: str
    service: str
    desired: int
    running: int
    backlog: int
    """Tasks queued or held by a worker (num_pending + num_ack_pending)."""
    in_flight: int
    waiting: int
    """Idle pull requests."""
    arrival_rate: float
    """Jobs per second entering the stage (smoothed)."""
    throughput: float
    """Jobs per second the stage finished (smoothed)."""
    predicted_s: float | None = None
    """Predicted seconds per job on the reference device, for the jobs measured."""
    measured_s: float | None = None
    predictor_error: float | None = None
    """Running mean of |predicted - measured| / measured over the stage's models."""
    pinned: bool = False


class SchedulerStatus(BaseModel):
    t: float = Field(default_factory=time.time)
    policy: str
    actuator: str
    pool: str
    tick_s: float
    stages: list[StageState]
    pins: dict[str, int] = Field(default_factory=dict)
    """Replicas per service an operator fixed (``disagfusion scale``), until released."""
    results: int = 0
    """Results seen in the latency window."""
    throughput: float = 0.0
    """Results per second over the latency window."""
    p50_s: float | None = None
    p95_s: float | None = None
    """End-to-end latency (submitted to finished) of the results in the window."""
    last_error: str | None = None
    """The last actuator failure, if the last apply failed."""

    def fresh(self, now: float | None = None) -> bool:
        """Whether a scheduler published this recently enough to be running."""
        return (now or time.time()) - self.t < max(30.0, 3 * self.tick_s)


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
        entry = await kv.get(STATUS_KEY)
    except KeyNotFoundError:
        return None
    return SchedulerStatus.model_validate_json(entry.value) if entry.value else None


async def read_pins(kv: KeyValue) -> dict[str, int]:
    try:
        entry = await kv.get(PINS_KEY)
    except (KeyNotFoundError, NoKeysError):
        return {}
    return {str(k): int(v) for k, v in json.loads(entry.value or b"{}").items()}


async def update_pins(js: JetStreamContext, pin: dict[str, int], release: list[str] | None) -> dict[str, int]:
    """Add ``pin`` and drop the services in ``release`` (all pins when it is empty; none when
    None); returns the pins now in force."""
    kv = await scheduler_bucket(js, create=True)
    pins = await read_pins(kv)
    if release is not None:
        pins = {k: v for k, v in pins.items() if release and k not in release}
    pins.update(pin)
    await kv.put(PINS_KEY, json.dumps(pins).encode())
    return pins
