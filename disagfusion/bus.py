"""NATS JetStream plumbing shared by every service and client.

Streams, consumers and the outputs bucket are declared here once; ``ensure_*`` calls are
idempotent, so any process that starts first creates them and the rest find them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ObjectStoreConfig, PubAck, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from disagfusion import stream_limits
from disagfusion.config import BusSettings, comma_list
from disagfusion.protocol import (
    ATTEMPTS_BUCKET,
    CHECKPOINTS_BUCKET,
    DLQ_STREAM,
    HANDBACKS_BUCKET,
    JOBS_BUCKET,
    OUTPUTS_BUCKET,
    RESULTS_STREAM,
    STAGES,
    WORK_STREAM,
    Stage,
    consumer_name,
    tenant_inbox,
    work_subject,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DUPLICATE_WINDOW_S = 300.0
"""Publishes with the same Nats-Msg-Id inside this window are stored once, so a stage that is
replayed after a crash does not create a second task or a second result."""


JETSTREAM_UNAVAILABLE = (nats.errors.TimeoutError, nats.errors.NoRespondersError, ServiceUnavailableError)
"""What JetStream's API answers while it cannot serve for a while: a cluster electing a stream
or meta leader after a node died (about 10 s here), or a server still starting."""

JETSTREAM_WAIT_S = 60.0
"""How long ``connect`` (and ``wait_out_unavailable`` unless told otherwise) waits out an
unavailable JetStream before giving up."""


async def wait_out_unavailable(request: Callable[[], Awaitable[T]], timeout: float = JETSTREAM_WAIT_S) -> T:
    """``request()`` (a JetStream API call), retried each second while JetStream is
    unavailable (``JETSTREAM_UNAVAILABLE``); after ``timeout`` seconds the last error is raised."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await request()
        except JETSTREAM_UNAVAILABLE:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(1.0)


@dataclass
class Bus:
    nc: NATS
    js: JetStreamContext

    async def close(self) -> None:
        # Every publish was awaited already; drain() would wait out its timeout on the
        # pull subscriptions' pending requests.
        await self.nc.close()


async def connect(settings: BusSettings, name: str) -> Bus:
    """Connect and make sure the streams exist. Reconnects forever: a NATS restart must not
    take the services down with it."""
    nc = await nats.connect(
        servers(settings.nats_url),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        connect_timeout=5,
        tls=settings.nats_tls(),
        inbox_prefix=tenant_inbox(settings.tenant),
    )
    js = nc.jetstream()
    try:
        await wait_out_unavailable(lambda: ensure_streams(js, settings))
    except JETSTREAM_UNAVAILABLE:
        await nc.close()
        raise
    return Bus(nc, js)


def servers(nats_url: str) -> list[str]:
    """``DF_NATS_URL`` as the server list nats-py takes: one URL or a cluster's comma-separated nodes."""
    return comma_list(nats_url)


async def _ensure_stream(js: JetStreamContext, config: StreamConfig, settings: BusSettings) -> None:
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.stream_info(config.name)  # created by a racing process in between
        return
    await _upgrade(js, info.config, config)
    await stream_limits.apply(js, info.config, info.state, config, settings)


async def _upgrade(js: JetStreamContext, current: StreamConfig, wanted: StreamConfig) -> None:
    """Give a stream made by an earlier version the subjects and direct gets this one uses
    (tenants' entry subjects and reads). Only the stages may; others use the stream as it is."""
    changes = {}
    if not set(wanted.subjects or ()) <= set(current.subjects or ()):
        changes["subjects"] = sorted(set(current.subjects or ()) | set(wanted.subjects or ()))
    if wanted.allow_direct and not current.allow_direct:
        changes["allow_direct"] = True
    if not changes:
        return
    try:
        await js.update_stream(dataclasses.replace(current, **changes))
        log.info("stream %s upgraded: %s", current.name, changes)
    except Exception as exc:
        log.warning("stream %s not upgraded to %s (%s): tenants cannot use it until a stage upgrades it",
                    current.name, changes, exc)


async def ensure_streams(js: JetStreamContext, settings: BusSettings) -> None:
    if settings.tenant:  # it may only look at DF_WORK, to publish and to see the queue's depth
        await js.stream_info(WORK_STREAM)
        return
    await _ensure_stream(
        js,
        StreamConfig(
            name=WORK_STREAM,
            # Only the stages' subjects, and tenants' entry subjects: a task for a stage nobody
            # runs is refused at publish (no stream matches) instead of waiting forever.
            subjects=[*(work_subject(stage, "*") for stage in STAGES), work_subject(Stage.ENCODE, "*", "*")],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            num_replicas=settings.stream_replicas,
            **stream_limits.work(settings),
        ),
        settings,
    )
    for name, subjects, max_age_s, limits in (
        (RESULTS_STREAM, "df.results.>", settings.results_max_age_s, stream_limits.results(settings)),
        (DLQ_STREAM, "df.dlq.>", settings.dlq_max_age_s, {}),
    ):
        await _ensure_stream(
            js,
            StreamConfig(
                name=name,
                subjects=[subjects],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=float(max_age_s),
                duplicate_window=DUPLICATE_WINDOW_S,
                # A tenant reads its results message by message with the subject in the request's
                # subject (DIRECT.GET.<stream>.<subject>), which NATS permissions can check.
                allow_direct=True,
                num_replicas=settings.stream_replicas,
                **limits,
            ),
            settings,
        )


async def outputs_bucket(js: JetStreamContext, settings: BusSettings, name: str = OUTPUTS_BUCKET) -> ObjectStore:
    """The large outputs, kept ``results_max_age_s`` (``disagfusion.stream_limits``): ``name`` is
    ``DF_OUTPUTS``, or a tenant's ``DF_OUTPUTS_<tenant>`` (``protocol.outputs_bucket_name``),
    made by the first stage that stores an output of the tenant's."""
    limits = stream_limits.outputs(settings)
    try:
        bucket = await js.object_store(name)
    except NotFoundError:
        try:
            return await js.create_object_store(
                name, config=ObjectStoreConfig(replicas=settings.stream_replicas, **limits))
        except BadRequestError:
            return await js.object_store(name)
    if settings.tenant:  # a tenant may read its bucket, not change its limits
        return bucket
    info = await js.stream_info(f"OBJ_{name}")  # an object store is the stream OBJ_<bucket>
    await stream_limits.apply(js, info.config, info.state, dataclasses.replace(
        info.config, max_age=limits["ttl"], max_bytes=limits["max_bytes"]), settings)
    return bucket


HANDBACK_TTL_S = 24 * 3600.0
"""A hand-back is remembered this long; a task queued longer counts it as a failed delivery."""


async def handbacks_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    """How often a draining worker handed each task back (key ``<job_id>.<stage>``). Those
    redeliveries are not failures, so they do not count against ``max_deliver``."""
    return await _task_bucket(js, HANDBACKS_BUCKET, replicas)


async def attempts_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    """Which worker took the latest delivery of each task (key ``<job_id>.<stage>``)."""
    return await _task_bucket(js, ATTEMPTS_BUCKET, replicas)


async def jobs_bucket(js: JetStreamContext, settings: BusSettings) -> KeyValue:
    """Each job's state and cancel mark (``disagfusion.job_state``), kept as long as results."""
    return await _task_bucket(js, JOBS_BUCKET, settings.stream_replicas, float(settings.results_max_age_s))


async def checkpoints_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    """The latest checkpoint of each running denoising job (key ``<job_id>.<replay>``)."""
    return await _task_bucket(js, CHECKPOINTS_BUCKET, replicas)


async def _task_bucket(js: JetStreamContext, name: str, replicas: int, ttl_s: float = HANDBACK_TTL_S) -> KeyValue:
    """A key-value bucket of one entry per task or job, kept ``ttl_s``; created by whoever comes first."""
    try:
        return await js.key_value(name)
    except BucketNotFoundError:
        try:
            # direct: a tenant gets its keys with DIRECT.GET.<stream>.<subject>, which NATS
            # permissions can check (a MSG.GET names the key in its body).
            return await js.create_key_value(bucket=name, history=1, ttl=ttl_s, replicas=replicas, direct=True)
        except BadRequestError:
            return await js.key_value(name)


async def ensure_consumer(js: JetStreamContext, stage: str, model: str, ack_wait_s: float) -> str:
    """The durable pull consumer every instance of ``stage`` serving ``model`` shares."""
    durable = consumer_name(stage, model)
    # Jobs enter on the model's subject and on each tenant's (``work_subject``).
    entry = [work_subject(stage, model), work_subject(stage, model, "*")] if stage == Stage.ENCODE else None
    config = ConsumerConfig(
        durable_name=durable,
        filter_subject=None if entry else work_subject(stage, model),
        filter_subjects=entry,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        # Redelivery is bounded by the worker itself (settings.max_deliver), which answers the
        # job with an error result; a server-side limit would drop the message silently.
        max_deliver=-1,
    )
    try:
        await js.add_consumer(WORK_STREAM, config)
    except BadRequestError:
        await js.consumer_info(WORK_STREAM, durable)  # exists with another config: use it as is
    return durable


async def publish(js: JetStreamContext, subject: str, payload: bytes, msg_id: str) -> PubAck:
    """Publish and wait for the stream's ack; ``msg_id`` deduplicates retries (the ack's
    ``duplicate`` says the stream already held a message with that id)."""
    return await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
