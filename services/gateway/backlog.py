"""The JetStream backlog of each stage: what the dashboard shows (and the gateway's metrics
export), read from the stage consumers of DF_WORK."""

from __future__ import annotations

from nats.js import JetStreamContext

from disagfusion.protocol import STAGES
from disagfusion.status import read_stage_status


async def stage_backlog(js: JetStreamContext) -> dict[str, int]:
    """Stage name → tasks queued or held by a worker (num_pending + num_ack_pending), summed
    over the stage's consumers (one per model); every stage is present, 0 when idle."""
    backlog = {str(stage): 0 for stage in STAGES}
    for row in await read_stage_status(js):
        backlog[str(row.stage)] += row.backlog
    return backlog
