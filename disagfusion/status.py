"""What the queues say about each stage: the numbers behind ``disagfusion status``."""

from __future__ import annotations

from pydantic import BaseModel

from disagfusion import bus
from disagfusion.config import Settings
from disagfusion.protocol import STAGES, WORK_STREAM, parse_consumer_name


class StageStatus(BaseModel):
    stage: str
    service: str
    model: str
    backlog: int
    """Tasks waiting or held by a worker: num_pending + num_ack_pending."""
    in_flight: int
    """Tasks delivered to a worker and not yet acked."""
    waiting: int
    """Pull requests waiting for work: idle capacity."""


async def stage_status(settings: Settings) -> list[StageStatus]:
    stack = await bus.connect(settings, "disagfusion-status")
    try:
        consumers = await stack.js.consumers_info(WORK_STREAM)
    finally:
        await stack.close()
    rows = []
    for info in consumers:
        named = parse_consumer_name(info.name)
        if named is None:
            continue
        stage, model = named
        rows.append(
            StageStatus(
                stage=stage,
                service=stage.service,
                model=model,
                backlog=info.num_pending + info.num_ack_pending,
                in_flight=info.num_ack_pending,
                waiting=info.num_waiting,
            )
        )
    return sorted(rows, key=lambda r: (STAGES.index(r.stage), r.model))
