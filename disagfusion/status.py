"""What the queues say about each stage: the numbers behind ``disagfusion status``."""

from __future__ import annotations

from nats.js import JetStreamContext
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
        return await read_stage_status(stack.js)
    finally:
        await stack.close()


def served_models(rows: list[StageStatus]) -> list[str]:
    """Models with a consumer on every stage: those a job can be submitted for and finish."""
    stages_of: dict[str, set[str]] = {}
    for row in rows:
        stages_of.setdefault(row.model, set()).add(row.stage)
    return sorted(model for model, stages in stages_of.items() if stages == set(STAGES))


async def read_stage_status(js: JetStreamContext) -> list[StageStatus]:
    """``stage_status`` over a connection the caller holds."""
    consumers = await js.consumers_info(WORK_STREAM)
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
