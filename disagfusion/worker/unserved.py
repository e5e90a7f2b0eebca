"""Answering jobs sent for a model nobody serves, a duty of whichever worker takes jobs where
they enter (the encoder, or the monolithic pipeline in its place).

Jobs enter the system on ``df.work.encode.<model>``. If no worker serves that model, no
consumer reads the subject and the job would wait in the stream forever. An entry worker looks
for such subjects and answers their jobs with an error result naming the models served.
"""

from __future__ import annotations

import asyncio
import logging

from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError

from disagfusion.protocol import (
    WORK_STREAM,
    DecodeError,
    Stage,
    StageTask,
    job_id_of_msg_id,
    parse_consumer_name,
    parse_work_subject,
    unpack,
    unserved_consumer_name,
    work_subject,
)
from disagfusion.worker.envelope import foreign_job_id, msg_id_of
from disagfusion.worker.stage_worker import StageWorker

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0


class EntryWorker(StageWorker):
    """A worker on the encode stage's queue that also answers jobs for models nobody serves."""

    async def setup(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._sweep()
            except Exception as exc:  # racing sweepers of other encoders, NATS reconnecting
                log.debug("sweep for unserved models failed: %s", exc)
            await asyncio.sleep(SWEEP_INTERVAL_S)

    async def _sweep(self) -> None:
        info = await self.js.stream_info(WORK_STREAM, subjects_filter="df.work.>")
        waiting = info.state.subjects or {}
        if not waiting:
            return
        consumers = set(filter(None, (parse_consumer_name(c.name) for c in await self.js.consumers_info(WORK_STREAM))))
        known = sorted(model for stage, model in consumers if stage == Stage.ENCODE)
        for subject in waiting:
            stage, model = parse_work_subject(subject) or ("", "")
            if model in known or (stage, model) in consumers:
                continue
            # A later stage's task for a model no encoder serves came from outside the pipeline
            # (a dit scaled to zero for a served model is only waiting for its instances).
            await self._reject_all(subject, stage, model, known)

    async def _reject_all(self, subject: str, stage: str, model: str, known: list[str]) -> None:
        # A WorkQueue stream allows one consumer per subject; this one is removed right after,
        # so an encoder that starts serving the model later can create its own.
        durable = unserved_consumer_name(stage, model)
        sub = await self.js.pull_subscribe(
            subject, durable=durable, stream=WORK_STREAM, config=ConsumerConfig(inactive_threshold=30.0)
        )
        try:
            while True:
                try:
                    msgs = await sub.fetch(64, timeout=0.2)
                except TimeoutError:
                    break
                for msg in msgs:
                    try:
                        job_id = unpack(StageTask, msg.data).job.job_id
                    except DecodeError as exc:
                        job_id = exc.job_id or job_id_of_msg_id(msg_id_of(msg))
                    if job_id is not None and foreign_job_id(subject, job_id) is None:
                        error = (f"unknown model {model!r}: no worker serves it (served models: {', '.join(known) or 'none'})"
                                 if stage == Stage.ENCODE else f"model {model!r} is not served: no worker takes its "
                                 f"{stage} tasks, and jobs enter at {work_subject(Stage.ENCODE, model)}")
                        await self.reject(job_id, error, field="model")
                    await msg.term()
        finally:
            await sub.unsubscribe()
            try:
                await self.js.delete_consumer(WORK_STREAM, durable)
            except NotFoundError:
                pass
