"""Checkpoints of denoising runs, so that another instance resumes a killed or drained DiT's job.

A checkpoint is one job's resume tensors (``disagfusion.models.resume``: latents and scheduler
state) stored through the tensor transport like any handoff (raw bytes, no pickle), and a
``Checkpoint`` record naming them under ``checkpoint_key`` in the ``DF_CHECKPOINTS`` bucket,
where the instance a task is redelivered to finds it. A job keeps one checkpoint: saving the
next deletes the previous one's tensors, and the job's checkpoint goes, record and tensors, once
its latents are handed on. What a crash leaves behind the janitor sweeps (tensors, after
``blob_ttl_s``) and the bucket's TTL expires (records, after a day).

Which steps are saved is the settings' rule (``due``); a checkpoint is a best effort: one that
cannot be saved or read costs the job its progress, never the job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from disagfusion.config import Settings
from disagfusion.errors import DisagFusionError
from disagfusion.models.base import Tensors
from disagfusion.protocol import Checkpoint, StageTask, checkpoint_key, pack, tensor_key, unpack
from disagfusion.transport import Transports
from disagfusion.worker import failures

log = logging.getLogger(__name__)

KV_TIMEOUT_S = 10.0
"""How long the compute thread waits for the bucket before giving a checkpoint up."""


class Preempted(DisagFusionError, RuntimeError):
    """A draining worker stopped a running batch at a checkpoint: its tasks are handed back (a
    hand-back, not a failure), and the instance that takes them resumes there."""


class Checkpoints:
    """One worker's checkpoints. ``save`` and ``load`` block (the compute thread calls them; the
    bucket is reached through the worker's event loop); ``discard`` is a coroutine."""

    def __init__(self, kv: KeyValue, transports: Transports, loop: asyncio.AbstractEventLoop, worker: str,
                 settings: Settings):
        self._kv = kv
        self._transports = transports
        self._loop = loop
        self._worker = worker
        self._every = settings.checkpoint_every
        self._min_steps = settings.checkpoint_min_steps
        self._latest: dict[str, Checkpoint] = {}
        """Key -> the checkpoint this worker saved or resumed from last, whose tensors it frees."""

    def due(self, step: int, total: int) -> bool:
        """Whether a run of ``total`` steps checkpoints after ``step``: every ``checkpoint_every``
        steps of a job of at least ``checkpoint_min_steps``, never after its last."""
        return bool(self._every) and total >= self._min_steps and step % self._every == 0 and step < total

    def _call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(KV_TIMEOUT_S)

    def save(self, task: StageTask, step: int, tensors: Tensors, batch_size: int) -> bool:
        """Store ``task``'s checkpoint after ``step``, replacing its previous one; False (and a
        warning) if it could not be stored."""
        spec, key = task.job, checkpoint_key(task.job.job_id, task.replay)
        refs = {}
        try:
            for i, (name, tensor) in enumerate(sorted(tensors.items())):
                refs[name] = self._transports.put(tensor_key(spec.job_id, task.stage, f"checkpoint{step}.{i}"), tensor)
            record = Checkpoint(job=spec, step=step, total=spec.steps, batch_size=batch_size, tensors=refs,
                                worker=self._worker)
            self._call(self._kv.put(key, pack(record)))
        except Exception as exc:
            log.warning("%s: job %s: checkpoint at step %d not saved: %s", self._worker, spec.job_id, step,
                        failures.describe(exc))
            self._delete_tensors(refs)
            return False
        previous = self._latest.get(key)
        self._latest[key] = record
        if previous is not None:
            self._delete_tensors(previous.tensors)
        return True

    def load(self, task: StageTask) -> tuple[Checkpoint, Tensors] | None:
        """``task``'s latest checkpoint and its tensors, or None: none saved, one of another spec,
        or one whose tensors are gone (the job then starts at step 0)."""
        spec, key = task.job, checkpoint_key(task.job.job_id, task.replay)
        try:
            entry = self._call(self._kv.get(key))
        except KeyNotFoundError:
            return None
        except Exception as exc:
            log.warning("%s: job %s: cannot look up its checkpoint (%s); it starts afresh", self._worker,
                        spec.job_id, failures.describe(exc))
            return None
        record = unpack(Checkpoint, entry.value)
        if record.job != spec:
            log.warning("%s: job %s: its checkpoint is of another spec; it starts afresh", self._worker, spec.job_id)
            return None
        try:
            tensors = self._transports.get_all(record.tensors)
        except Exception as exc:
            log.warning("%s: job %s: the tensors of its step-%d checkpoint are unreadable (%s); it starts afresh",
                        self._worker, spec.job_id, record.step, failures.describe(exc))
            return None
        self._latest[key] = record
        return record, tensors

    async def discard(self, task: StageTask) -> None:
        """Delete ``task``'s checkpoint, record and tensors, if this worker saved or resumed
        from one: its latents are handed on, so nothing will resume it."""
        record = self._latest.pop(checkpoint_key(task.job.job_id, task.replay), None)
        if record is None:
            return
        try:
            await self._kv.delete(checkpoint_key(task.job.job_id, task.replay))
        except Exception as exc:  # the bucket's TTL and the janitor remove them later
            log.warning("%s: job %s: its checkpoint was not deleted: %s", self._worker, task.job.job_id,
                        failures.describe(exc))
        await asyncio.to_thread(self._delete_tensors, record.tensors)

    def _delete_tensors(self, refs: dict) -> None:
        try:
            for ref in refs.values():
                self._transports.delete(ref)
        except Exception as exc:  # the janitor sweeps them after blob_ttl_s
            log.warning("%s: checkpoint tensors not deleted: %s", self._worker, failures.describe(exc))
