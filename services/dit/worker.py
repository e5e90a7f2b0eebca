"""The DiT service's worker: a stage worker whose denoising runs are checkpointed and resumed.

Every ``checkpoint_every`` steps of a long enough job (``Checkpoints.due``) the step callback
saves each job's latents and scheduler state; a task redelivered after its worker was killed
resumes from its latest checkpoint, bitwise equal to an uninterrupted run, with a ``resumed``
event. A draining worker (scale-down, SIGTERM) checkpoints a running batch at its next step
and hands it back when ``preempt_min_steps`` or more steps are left, instead of finishing it.
Models whose runs cannot be resumed (``StageModel.resumable``) run as in any stage worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from itertools import groupby

from disagfusion import bus
from disagfusion.models import resume
from disagfusion.models.base import Tensors
from disagfusion.protocol import StageTask
from disagfusion.worker.checkpoints import Checkpoints, Preempted
from disagfusion.worker.stage_worker import Job, StageSeconds, StageWorker


class DitWorker(StageWorker):
    _checkpoints: Checkpoints

    async def setup(self) -> None:
        await super().setup()
        kv = await bus.checkpoints_bucket(self.js, self.settings.stream_replicas)
        self._checkpoints = Checkpoints(kv, self.transports, asyncio.get_running_loop(), self.name, self.settings)

    def run_batch(self, batch: list[Job]) -> tuple[list[Tensors], StageSeconds]:
        if not self.models[batch[0].spec.model].resumable:
            return super().run_batch(batch)
        started = time.perf_counter()
        outputs: dict[int, Tensors] = {}
        # Jobs resume together only from one step (a scheduler steps a batch as one); a batch
        # that mixes fresh and resumed jobs runs as one call per starting step.
        starts = [(job, self._start(job)) for job in batch]
        for step, group in groupby(sorted(starts, key=lambda s: s[1][0]), key=lambda s: s[1][0]):
            jobs, tensors = zip(*((job, start[1]) for job, start in group))
            specs = [job.spec for job in jobs]
            if step:
                self.notify(specs, "resumed", self.stage, step=step, total=specs[0].steps)
            on_step = self._checkpointing(list(jobs), self.on_step(list(jobs)))
            model = self.models[specs[0].model]
            for job, output in zip(jobs, model.run(specs, [job.inputs | t for job, t in zip(jobs, tensors)], on_step)):
                outputs[id(job)] = output
        return [outputs[id(job)] for job in batch], {self.stage: time.perf_counter() - started}

    def _start(self, job: Job) -> tuple[int, Tensors]:
        """Where ``job`` starts: (0, {}) or its checkpoint's step and tensors. Only a
        redelivered task can have one, so a first delivery does not look."""
        if job.msg.metadata.num_delivered <= 1:
            return 0, {}
        found = self._checkpoints.load(job.task)
        return (found[0].step, found[1]) if found else (0, {})

    def _checkpointing(self, jobs: list[Job], on_step: Callable[[int, int], None]) -> Callable[[int, int], None]:
        """``on_step`` after checkpointing the batch when due, or when the worker drains with
        enough steps left, then handing the batch back (``Preempted``). The checkpoint comes
        before the step's event, so whoever sees step k can count on a checkpoint there."""
        preempt_min = self.settings.preempt_min_steps

        def checkpoint_then_step(step: int, total: int) -> None:
            preempt = self._stopping.is_set() and preempt_min and total - step >= preempt_min
            saved = False
            if preempt or self._checkpoints.due(step, total):
                states = run.capture() if (run := resume.current()) else None
                saved = bool(states) and all(
                    self._checkpoints.save(job.task, step, state, len(jobs)) for job, state in zip(jobs, states)
                )
            on_step(step, total)
            if preempt and saved:
                raise Preempted(f"drained at step {step} of {total}")

        return checkpoint_then_step

    async def emit(self, job: Job) -> None:
        await super().emit(job)
        await self._checkpoints.discard(job.task)

    async def job_ended(self, task: StageTask) -> None:
        await self._checkpoints.discard(task)  # failed or cancelled: nothing will resume it
