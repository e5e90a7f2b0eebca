"""The JetStream backlog per stage: tasks queued or held by a worker (num_pending +
num_ack_pending of each stage's consumers, summed over models), read from consumer info when
asked. Shared by the gateway's ``/metrics`` and its dashboard."""

from __future__ import annotations

import asyncio
from collections import Counter

from nats.js import JetStreamContext

from disagfusion.protocol import STAGES
from disagfusion.status import read_stage_status

BACKLOG_TIMEOUT_S = 1.0
"""A scrape or a dashboard refresh waits no longer than this for NATS."""


async def stage_backlog(js: JetStreamContext, timeout_s: float = BACKLOG_TIMEOUT_S) -> dict[str, int]:
    """Tasks queued or running per stage, every stage present (0 without a consumer yet).
    Raises ``TimeoutError`` when NATS does not answer within ``timeout_s``, and what NATS
    raises when it answers with an error."""
    rows = await asyncio.wait_for(read_stage_status(js), timeout_s)
    backlog = Counter({stage: 0 for stage in STAGES})
    for row in rows:
        backlog[row.stage] += row.backlog
    return {str(stage): n for stage, n in backlog.items()}
