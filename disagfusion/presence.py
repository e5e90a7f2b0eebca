"""Who is serving: each stage worker announces itself on ``df.presence.<stage>`` (core NATS, not
persisted) with every heartbeat, so any NATS client (the gateway's dashboard) can count the
instances that run a stage without asking the deployment (compose, Kubernetes, the launcher).
A worker not heard from for ``PRESENCE_MAX_AGE_S`` is gone."""

from __future__ import annotations

import logging
import time

from nats.aio.client import Client as NatsClient
from pydantic import Field

from disagfusion.health import MAX_AGE_S
from disagfusion.protocol import Message, pack

log = logging.getLogger(__name__)

PRESENCE_SUBJECTS = "df.presence.*"
PRESENCE_MAX_AGE_S = MAX_AGE_S
"""The health file's own limit: a worker heartbeats at most every 5 s, so three are missed."""


def presence_subject(stage: str) -> str:
    return f"df.presence.{stage}"


class Presence(Message):
    """One worker's heartbeat: it is connected and consuming ``stage`` for ``models``."""

    worker: str
    stage: str
    models: list[str]
    t: float = Field(default_factory=time.time)


async def announce(nc: NatsClient, worker: str, stage: str, models: list[str]) -> None:
    """Best effort: a lost announcement is made good by the next heartbeat."""
    try:
        await nc.publish(presence_subject(stage), pack(Presence(worker=worker, stage=stage, models=models)))
    except Exception as exc:  # a reconnect in progress: the next heartbeat announces again
        log.debug("presence not announced: %s", exc)
