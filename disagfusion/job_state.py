"""Each job's state, and its cancel, in the JetStream KV bucket ``DF_JOBS``.

Keys (``disagfusion.protocol``): ``state.<job_id>`` holds the job's latest ``JobState``
(queued; running at a stage, and at step k of n while denoising; done; error; cancelled), and
``cancel.<job_id>`` exists once the job is cancelled. Values are msgpack ``JobState`` maps. A
job id is one subject token (``A-Z a-z 0-9 _ -``, all legal in a KV key), so it is the key's
second token as is; a string that is not a token is no job id and has no key.

Writers: the submitting client (``queued``, only if no stage wrote first), the stages
(``running`` on each progress event, a step at most every ``STEP_WRITE_INTERVAL_S`` per job;
``done``, ``error`` or ``cancelled`` once they published the result, also when answering a cancel). Every
write is best effort: a KV hiccup never fails a job, and the job's result stays the truth.

Cancel (``cancel``): mark the job, then ask a stage (a core NATS request on
``df.cancel.<job_id>``, answered by one worker of the queue group ``CANCEL_QUEUE``) to publish
its ``cancelled`` result under the result's message id, so that a job still gets exactly one
result: if another result came first the publish is a duplicate and the job had finished. Only
stage users publish results, so a client can trust whoever answered. Stages know the marks from
a watch on ``cancel.>`` (``JobStates.cancelled``: a dict lookup, cheap enough for every denoising step);
they drop a cancelled job wherever they meet it (``StageWorker._drop_cancelled``), and the
denoising loop stops after the step in which every job of its batch is cancelled
(``JobStates.stop_if_cancelled``, raising ``JobsCancelled`` from the step callback).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import xxhash
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from disagfusion import bus
from disagfusion.config import BusSettings
from disagfusion.errors import DisagFusionError
from disagfusion.protocol import (
    RESULTS_STREAM,
    JobSpec,
    JobState,
    ProgressEvent,
    Result,
    cancel_key,
    cancel_subject,
    is_job_id,
    job_state_key,
    pack,
    result_msg_id,
    results_subject,
    spec_key,
    unpack,
)

log = logging.getLogger(__name__)

STEP_WRITE_INTERVAL_S = 0.25
"""A job's step is written at most this often (and at its last step): a fast denoising loop
must not turn into a KV write per step."""
MAX_CANCELLED = 100_000
"""Cancel marks a worker remembers; the oldest are forgotten first (their jobs are long gone)."""
WATCH_READY_S = 5.0
"""How long a worker waits for the marks made before it started before it serves anyway."""
PENDING_WRITES = 10_000
"""States waiting to be written; more are dropped (NATS is away, and they are best effort)."""
CANCEL_QUEUE = "df-cancel"
"""The queue group of the stage workers answering ``df.cancel.<job_id>``: one of them answers."""
CANCEL_ANSWER_S = 10.0
"""How long a canceller waits for a stage to answer before it reports the cancel pending."""


class JobsCancelled(DisagFusionError):
    """Every job of a running batch is cancelled: raised from the step callback to stop the loop."""

    def __init__(self, step: int, total: int):
        super().__init__(f"cancelled at step {step} of {total}")
        self.step, self.total = step, total


async def read_state(kv: KeyValue, job_id: str) -> JobState | None:
    """A job's latest state, or None (never written, expired, or no job id)."""
    entry = await _state_entry(kv, job_id)
    return unpack(JobState, entry.value) if entry is not None and entry.value else None


async def _state_entry(kv: KeyValue, job_id: str) -> KeyValue.Entry | None:
    if not is_job_id(job_id):
        return None
    try:
        return await kv.get(job_state_key(job_id))
    except KeyNotFoundError:
        return None


async def find_result(js: JetStreamContext, job_id: str) -> Result | None:
    """A job's result if it has one now."""
    try:
        # Direct: the subject is in the request's subject, where a tenant's permissions see it.
        msg = await js.get_last_msg(RESULTS_STREAM, results_subject(job_id), direct=True)
    except NotFoundError:
        return None
    return unpack(Result, msg.data)


class CancelPending(DisagFusionError):
    """The job is marked cancelled, but no stage answered: the stage that takes it will."""

    def __init__(self, job_id: str, why: str):
        super().__init__(f"job {job_id} is marked cancelled, but {why}: it gets its cancelled result when a stage "
                         "takes it")
        self.job_id = job_id


class JobIdInUse(DisagFusionError, ValueError):
    """A job id already submitted with another spec: a new job needs a new id."""

    field = "job_id"


async def claim(kv: KeyValue, spec: JobSpec) -> None:
    """Reserve ``spec.job_id`` for ``spec`` before it is published (kept as long as results).
    Submitting the same spec again is a retry and passes; another spec under the id raises
    ``JobIdInUse``: JetStream would drop its publish as a duplicate (inside the duplicate
    window) or run it as a second job with the first one's result subject (after it)."""
    digest = xxhash.xxh3_64_hexdigest(pack(spec)).encode()
    try:
        await kv.create(spec_key(spec.job_id), digest)
        return
    except KeyWrongLastSequenceError:
        pass
    entry = await kv.get(spec_key(spec.job_id))
    if entry.value != digest:
        raise JobIdInUse(f"job_id {spec.job_id!r} is already in use by another job (submitted with a different "
                         "spec): give this job a new job_id")


async def mark_queued(kv: KeyValue, job_id: str, by: str) -> None:
    """Write ``queued`` after the job is published, unless a stage already wrote its state."""
    try:
        await kv.create(job_state_key(job_id), pack(JobState(job_id=job_id, state="queued", by=by)))
    except KeyWrongLastSequenceError:
        pass  # a stage took it already
    except Exception as exc:
        log.debug("state of job %s not written: %s", job_id, exc)


async def publish_cancelled(js: JetStreamContext, job_id: str, stage: str | None, by: str, replay: int = 0) -> Result:
    """The job's ``cancelled`` result, unless it has a result: then that one. Published under the
    result's message id, so of two racing results only the first is stored."""
    existing = await find_result(js, job_id)
    if existing is not None:
        return existing
    result = Result.cancelled(job_id, stage, by)
    ack = await bus.publish(js, results_subject(job_id), pack(result), result_msg_id(job_id, replay))
    if ack.duplicate:
        return await find_result(js, job_id) or result
    return result


async def cancel(jobs_bus: bus.Bus, settings: BusSettings, job_id: str, by: str, known: bool = False,
                 timeout: float = CANCEL_ANSWER_S) -> Result | None:
    """Cancel a job: mark it, so that stages drop it, and ask a stage to give it its ``cancelled``
    result now. Returns the job's one result (``cancelled``, or the result it finished with
    first), or None for a job that nobody knows (no state, no result, and not ``known`` to the
    caller). Raises ``CancelPending`` when no stage answers within ``timeout`` seconds."""
    if not is_job_id(job_id):
        return None
    result = await find_result(jobs_bus.js, job_id)
    if result is not None:
        return result
    kv = await bus.jobs_bucket(jobs_bus.js, settings)
    if await _state_entry(kv, job_id) is None and not known:
        return None
    await kv.put(cancel_key(job_id), pack(JobState(job_id=job_id, state="cancelled", by=by)))
    try:
        answer = await jobs_bus.nc.request(cancel_subject(job_id), b"", timeout=timeout)
    except NoRespondersError:
        raise CancelPending(job_id, "no stage is running") from None
    except TimeoutError:
        raise CancelPending(job_id, f"no stage answered within {timeout:.0f} s") from None
    if not answer.data:
        raise CancelPending(job_id, "the stage asked found no cancel mark yet")
    return unpack(Result, answer.data)


async def answer_cancel(js: JetStreamContext, kv: KeyValue, job_id: str) -> Result | None:
    """A stage's answer to a cancel request: the job's ``cancelled`` result (published now, unless
    it has a result: then that one), or None when the job carries no cancel mark."""
    try:
        mark = (await kv.get(cancel_key(job_id))).value
    except KeyNotFoundError:
        return None
    try:  # any value marks the job; a JobState names who cancelled it
        by = unpack(JobState, mark).by or "a client"
    except ValueError:
        by = "a client"
    seen = await _state_entry(kv, job_id)
    result = await publish_cancelled(js, job_id, None, by)
    if result.status == "cancelled":
        cancelled = JobState(job_id=job_id, state="cancelled", by=by)
        try:  # unless a stage wrote since: it holds the job, and its state will say where it dropped it
            await kv.update(job_state_key(job_id), pack(cancelled), last=seen.revision if seen else 0)
        except KeyWrongLastSequenceError:
            pass
    return result


class JobStates:
    """A stage worker's side of ``DF_JOBS``: it writes the states of the jobs it runs (in order,
    from one writer task, best effort) and knows the cancelled ones from a watch."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, by: str):
        self._js = js
        self._kv = kv
        self._by = by
        self._cancelled: dict[str, None] = {}
        """Cancelled job ids, oldest first (read from the compute thread: ``in`` is atomic)."""
        self._last_step: dict[str, float] = {}
        self._writes: asyncio.Queue[JobState] = asyncio.Queue(maxsize=PENDING_WRITES)
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._answering: Subscription | None = None

    @classmethod
    async def open(cls, stage_bus: bus.Bus, settings: BusSettings, by: str) -> JobStates:
        """Open the bucket, start watching cancel marks (waiting a little for those made before)
        and answering cancel requests in the queue group ``CANCEL_QUEUE``."""
        states = cls(stage_bus.js, await bus.jobs_bucket(stage_bus.js, settings), by)
        states._answering = await stage_bus.nc.subscribe(cancel_subject(">"), queue=CANCEL_QUEUE, cb=states._answer)
        watcher = await states._kv.watch(cancel_key(">"))
        states._tasks = [asyncio.create_task(states._watch(watcher), name="cancel watch"),
                         asyncio.create_task(states._write_loop(), name="job states")]
        try:
            await asyncio.wait_for(states._ready.wait(), WATCH_READY_S)
        except TimeoutError:
            log.warning("%s: the cancel marks made before it started did not arrive within %.0f s", by, WATCH_READY_S)
        return states

    async def close(self) -> None:
        if self._answering is not None:
            await self._answering.unsubscribe()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ cancel

    def cancelled(self, job_id: str) -> bool:
        return job_id in self._cancelled

    async def _answer(self, msg: Msg) -> None:
        """Answer ``df.cancel.<job_id>`` with the job's one result; an empty reply says the job
        carries no cancel mark (put the mark first), and a failure leaves the canceller to wait."""
        job_id = msg.subject.removeprefix(cancel_subject(""))
        try:
            result = await answer_cancel(self._js, self._kv, job_id) if is_job_id(job_id) else None
            if msg.reply:
                await msg.respond(pack(result) if result is not None else b"")
        except Exception as exc:
            log.warning("%s: cancel of job %s not answered: %s", self._by, job_id, exc)

    def stop_if_cancelled(self, job_ids: Iterable[str], step: int, total: int) -> None:
        """Raise ``JobsCancelled`` when every job of a batch is cancelled (from its step callback);
        a batch with one job left running goes on, so that job's pixels do not change."""
        if all(job_id in self._cancelled for job_id in job_ids):
            raise JobsCancelled(step, total)

    async def _watch(self, watcher: KeyValue.KeyWatcher) -> None:
        prefix = cancel_key("")
        async for entry in watcher:
            if entry is None:  # the marks made before the watch began are in
                self._ready.set()
                continue
            job_id = entry.key.removeprefix(prefix)
            if entry.operation in (KV_DEL, KV_PURGE):
                self._cancelled.pop(job_id, None)
                continue
            self._cancelled[job_id] = None
            if len(self._cancelled) > MAX_CANCELLED:
                self._cancelled.pop(next(iter(self._cancelled)))

    # ------------------------------------------------------------------ states

    def on_event(self, event: ProgressEvent) -> None:
        """The state a progress event stands for: ``running`` at a stage (and step)."""
        if event.kind == "stage_started":
            self.write(JobState(job_id=event.job_id, state="running", stage=event.stage, by=self._by))
        elif event.kind == "step" and event.step is not None:
            now = time.monotonic()
            if event.step < (event.total or 0) and now - self._last_step.get(event.job_id, -1e9) < STEP_WRITE_INTERVAL_S:
                return
            self._last_step[event.job_id] = now
            self.write(JobState(job_id=event.job_id, state="running", stage=event.stage, step=event.step,
                                total=event.total, by=self._by))
        elif event.kind == "stage_done":
            self._last_step.pop(event.job_id, None)

    def on_result(self, result: Result) -> None:
        """The state a published result ends the job in."""
        self._last_step.pop(result.job_id, None)
        state = {"ok": "done", "error": "error", "cancelled": "cancelled"}[result.status]
        self.write(JobState(job_id=result.job_id, state=state, stage=result.stage, by=self._by))

    def dropped(self, job_id: str, stage: str, step: int | None = None, total: int | None = None) -> None:
        """A cancelled job left ``stage`` (after ``step`` of ``total``): the state says where it stopped."""
        self._last_step.pop(job_id, None)
        self.write(JobState(job_id=job_id, state="cancelled", stage=stage, step=step, total=total, by=self._by))

    def write(self, state: JobState) -> None:
        try:
            self._writes.put_nowait(state)
        except asyncio.QueueFull:
            log.debug("state %s of job %s dropped: too many writes pending", state.state, state.job_id)

    async def _write_loop(self) -> None:
        while True:
            state = await self._writes.get()
            try:
                await self._kv.put(job_state_key(state.job_id), pack(state))
            except Exception as exc:
                log.debug("state %s of job %s not written: %s", state.state, state.job_id, exc)
