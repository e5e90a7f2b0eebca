"""The worker every stage service runs.

A ``StageWorker`` serves one stage (encode, denoise or decode) for the models in
``DF_MODELS``. Each job goes through three parts joined by bounded queues:

    fetcher  ──▶  compute  ──▶  sender
    pull the task and      run the model in a     store outputs, publish
    load its input         thread, so the loop    downstream, ack the input,
    tensors                keeps fetching/sending  then delete the input tensors

In ``async`` mode (the default) the three overlap: while job k computes, job k+1's tensors
are being fetched and job k-1's outputs shipped. ``DF_PIPELINE=sync`` allows one job in
flight, which runs the same parts one after another, for comparison. A busy worker fetches
the next job only when the work in hand will be done within ``DF_FETCH_AHEAD_S``: a job
fetched ahead waits behind it, and JetStream may give it to this worker's pull while another
instance idles.

Delivery: the input is acked only after the output's publish is acknowledged by JetStream,
and input tensors are deleted only after that, so a crash at any point leaves the task to be
redelivered and replayed. Publishes carry ``Nats-Msg-Id = <job_id>:<stage>`` so replays are
harmless. Bad input (undecodable message, invalid spec, missing blob, too many deliveries)
ends in an error result and a terminated message, never a redelivery loop.

SIGTERM/SIGINT drain the worker: it stops pulling, finishes and acks the batch it is running,
hands back (nak) the jobs it fetched ahead but has not started, so that the instances that stay
start them at once, and exits.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from disagfusion import bus
from disagfusion.config import Settings
from disagfusion.cost import cost_key
from disagfusion.health import health_path, write_health
from disagfusion.models import load_stage_model
from disagfusion.models.base import SpecError, StageModel, Tensors
from disagfusion.protocol import (
    ChecksumError,
    DecodeError,
    JobSpec,
    MissingBlobError,
    ProgressEvent,
    Result,
    Stage,
    StageTask,
    TimingSample,
    events_subject,
    metrics_subject,
    pack,
    result_msg_id,
    results_subject,
    task_msg_id,
    unpack,
    work_subject,
)
from disagfusion.transport import Transports

log = logging.getLogger(__name__)

ModelLoader = Callable[[str, str, Settings], StageModel]


@dataclass
class Job:
    """A task while this worker holds it."""

    msg: Msg
    task: StageTask
    inputs: Tensors = field(default_factory=dict)
    outputs: Tensors = field(default_factory=dict)
    compute_s: float = 0.0
    """This job's share of its batch's compute time."""
    batch_size: int = 1

    @property
    def spec(self) -> JobSpec:
        return self.task.job


class StageWorker:
    def __init__(self, stage: str, settings: Settings, load_model: ModelLoader = load_stage_model):
        self.stage = stage
        self.settings = settings
        # The random tail keeps names unique where host and pid are not: replicas of one
        # container image with host networking all run as the same pid on the same host name.
        self.name = settings.worker_name or (
            f"{Stage(stage).service}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        )
        self.model_names = settings.model_names
        self._load_model = load_model
        self.models: dict[str, StageModel] = {}
        self.transports = Transports(settings)
        self._stopping = asyncio.Event()
        self._held: dict[int, Msg] = {}
        """Messages taken and not yet acked, termed or handed back (keyed by id: Msg is unhashable)."""
        self._slots = asyncio.Semaphore(settings.jobs_in_flight)
        self._to_compute: asyncio.Queue[Job] = asyncio.Queue(maxsize=max(settings.prefetch, settings.max_batch))
        self._carried: list[Job] = []
        self._to_send: asyncio.Queue[Job] = asyncio.Queue(maxsize=settings.prefetch)
        self._bus: bus.Bus | None = None
        self._handbacks: KeyValue | None = None
        self._job_s: dict[tuple, float] = {}
        """Measured seconds per job, by ``JobSpec.cost_key``: how long the jobs in hand take."""
        self._waiting: dict[int, JobSpec] = {}
        """Jobs admitted and not yet started (keyed like ``_held``)."""
        self._running: tuple[float, float] | None = None
        """The batch computing: (its estimated seconds, its perf_counter() start)."""
        self._progress = asyncio.Event()
        """Set when a batch starts or ends (or the worker stops): the work in hand changed."""

    @property
    def js(self):
        assert self._bus is not None, "worker is not connected"
        return self._bus.js

    # ----------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or ``stop()``), then drain."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        for name in self.model_names:
            self.models[name] = await asyncio.to_thread(self._load_model, name, self.stage, self.settings)
        self._bus = await bus.connect(self.settings, self.name)
        self._handbacks = await bus.handbacks_bucket(self.js)
        await self.setup()
        fetchers = []
        for name in self.model_names:
            durable = await bus.ensure_consumer(self.js, self.stage, name, self.settings.ack_wait_s)
            sub = await self.js.pull_subscribe_bind(durable, bus.WORK_STREAM)
            fetchers.append(asyncio.create_task(self._fetch_loop(sub)))
        helpers = [
            asyncio.create_task(self._compute_loop()),
            asyncio.create_task(self._send_loop()),
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._janitor_loop()),
        ]
        log.info("%s serving %s for models %s (%s pipeline)", self.name, self.stage, self.model_names, self.settings.pipeline)
        await self._stopping.wait()
        log.info("%s draining", self.name)
        await self._drain(fetchers)
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        await self._bus.close()
        self.transports.close()
        log.info("%s stopped", self.name)

    def stop(self) -> None:
        self._stopping.set()
        self._progress.set()

    async def setup(self) -> None:
        """Hook for services that need more than the stage consumers (called once connected)."""

    async def _drain(self, fetchers: list[asyncio.Task]) -> None:
        """Stop pulling, hand back the jobs not started, wait for the running batch to be sent;
        hand back whatever outlasts the drain timeout.

        Scaling a stage down should move its queued work to the instances that stay at once,
        not keep it behind this one: a DiT holding three 14 s video jobs would take a minute to
        leave. JetStream redelivers a nak'd task before newer ones."""
        await self._hand_back(self._unstarted())  # also frees a fetcher blocked on a full queue
        await asyncio.gather(*fetchers)
        await self._hand_back(self._unstarted())  # what the fetchers took meanwhile
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self._held and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for msg in list(self._held.values()):
            await msg.nak()  # redelivered at once to another instance
        self._held.clear()

    # ----------------------------------------------------------------- the three parts

    async def _fetch_loop(self, sub) -> None:
        while not self._stopping.is_set():
            await self._until_fetch_ahead()
            await self._slots.acquire()
            if self._stopping.is_set():  # the slot was freed by a drain's hand-back
                self._slots.release()
                break
            # Take as many tasks as there are free slots, so the inputs of several jobs can be
            # fetched at once (a slow handoff then hides behind the others and behind compute).
            extra = 0
            while not self._slots.locked() and extra < self.settings.max_batch - 1:
                await self._slots.acquire()
                extra += 1
            try:
                msgs = await sub.fetch(1 + extra, timeout=1.0)
            except TimeoutError:
                msgs = []
            except Exception as exc:  # connection trouble: nats-py reconnects on its own
                log.warning("fetch failed: %s", exc)
                msgs = []
                await asyncio.sleep(0.5)
            for _ in range(1 + extra - len(msgs)):
                self._slots.release()
            for job in await asyncio.gather(*(self._admit(msg) for msg in msgs)):
                if job is None:
                    self._slots.release()
                else:
                    self._waiting[id(job.msg)] = job.spec
                    await self._to_compute.put(job)

    def _job_seconds(self, specs: list[JobSpec]) -> float:
        """What these jobs take here, as the last of each shape took: unknown (infinite) for a
        shape not run yet, so a worker does not take a second video job before it knows that
        the first takes 14 s."""
        return sum(self._job_s.get(cost_key(self.stage, spec), math.inf) for spec in specs)

    def _in_hand_s(self) -> float:
        """Estimated seconds until this worker has done what it holds: the rest of the running
        batch and the jobs waiting for the compute loop."""
        left = 0.0
        if self._running is not None:
            estimate, started = self._running
            left = max(0.0, estimate - (time.perf_counter() - started))
        return left + self._job_seconds(list(self._waiting.values()))

    async def _until_fetch_ahead(self) -> None:
        """Wait until the work in hand will be done within ``fetch_ahead_s``."""
        while not self._stopping.is_set():
            in_hand = self._in_hand_s()
            if in_hand <= self.settings.fetch_ahead_s:
                return
            self._progress.clear()
            try:
                timeout = None if math.isinf(in_hand) else in_hand - self.settings.fetch_ahead_s
                await asyncio.wait_for(self._progress.wait(), timeout=timeout)
            except TimeoutError:
                pass

    async def _admit(self, msg: Msg) -> Job | None:
        """Decode and check a task and load its inputs; answer bad input with an error result."""
        self._held[id(msg)] = msg
        try:
            task = unpack(StageTask, msg.data)
        except DecodeError as exc:
            # Report spec problems by JobSpec field name ("steps", not "job.steps").
            field = exc.field.removeprefix("job.") if exc.field else None
            await self._fail(msg, exc.job_id, str(exc), field)
            return None
        spec = task.job
        if msg.metadata.num_delivered > self.settings.max_deliver:
            failed = msg.metadata.num_delivered - await self._handbacks_of(spec)
            if failed > self.settings.max_deliver:
                await self._fail(msg, spec.job_id, f"gave up after {self.settings.max_deliver} delivery attempts")
                return None
        try:
            model = self.models.get(spec.model)
            if model is None:
                raise SpecError("model", f"model {spec.model!r} is not served by this worker ({self.model_names})")
            model.check(spec)
            inputs = await asyncio.to_thread(self._load_inputs, task)
        except SpecError as exc:
            await self._fail(msg, spec.job_id, str(exc), exc.field)
            return None
        except (MissingBlobError, ChecksumError) as exc:
            await self._fail(msg, spec.job_id, f"input of stage {self.stage} unusable: {exc}")
            return None
        await self.publish_event(spec.job_id, "stage_started")
        return Job(msg=msg, task=task, inputs=inputs)

    def _load_inputs(self, task: StageTask) -> Tensors:
        return self.transports.get_all(task.tensors)

    async def _next_batch(self) -> list[Job]:
        """The next job plus, within ``max_batch_wait_ms``, up to ``max_batch - 1`` more that can
        share its batch. Jobs that cannot are kept, in order, for the following batches."""
        first = self._carried.pop(0) if self._carried else await self._to_compute.get()
        batch, kept = [first], []
        for job in self._carried:
            (batch if len(batch) < self.settings.max_batch and self._batchable(first, job) else kept).append(job)
        self._carried = kept
        deadline = time.monotonic() + self.settings.max_batch_wait_ms / 1000
        while len(batch) < self.settings.max_batch:
            try:
                job = await asyncio.wait_for(self._to_compute.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
            (batch if self._batchable(first, job) else self._carried).append(job)
        return batch

    def _batchable(self, first: Job, other: Job) -> bool:
        # The encoder batches any prompts of one model; later stages need identical shapes.
        if self.stage == "encode":
            return first.spec.model == other.spec.model
        return first.spec.shape_key == other.spec.shape_key

    async def _compute_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if self._stopping.is_set():  # taken while draining: not started, so not ours to run
                await self._hand_back(batch)
                continue
            specs = [job.spec for job in batch]
            for job in batch:
                self._waiting.pop(id(job.msg), None)

            def on_step(step: int, total: int, job_ids: list[str] = [s.job_id for s in specs]) -> None:
                for job_id in job_ids:
                    loop.call_soon_threadsafe(
                        lambda j=job_id: asyncio.ensure_future(self.publish_event(j, "step", step=step, total=total))
                    )

            started = time.perf_counter()
            self._running = (self._job_seconds(specs), started)
            self._progress.set()
            try:
                model = self.models[specs[0].model]
                outputs = await asyncio.to_thread(model.run, specs, [job.inputs for job in batch], on_step)
            except Exception as exc:
                field = exc.field if isinstance(exc, SpecError) else None
                if field is None:
                    log.exception("stage %s failed on jobs %s", self.stage, [s.job_id for s in specs])
                for job in batch:
                    await self._fail(job.msg, job.spec.job_id, f"stage {self.stage} failed: {exc}", field)
                    self._slots.release()
                continue
            finally:
                self._running = None
                self._progress.set()
            seconds = time.perf_counter() - started
            for spec in specs:
                self._job_s[cost_key(self.stage, spec)] = seconds / len(specs)
            await self._publish_timing(specs, seconds)
            for job, output in zip(batch, outputs, strict=True):
                job.outputs, job.compute_s, job.batch_size = output, seconds / len(batch), len(batch)
                # Before the output is published, so a client never sees the result first.
                await self.publish_event(job.spec.job_id, "stage_done")
                await self._to_send.put(job)

    def _unstarted(self) -> list[Job]:
        """Take the jobs waiting for the compute loop out of its reach."""
        jobs, self._carried = self._carried, []
        while not self._to_compute.empty():
            jobs.append(self._to_compute.get_nowait())
        return jobs

    async def _hand_back(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        for job in jobs:
            try:
                handed = await self._handbacks_of(job.spec)
                await self._handbacks.put(self._handback_key(job.spec), str(handed + 1).encode())
                await job.msg.nak()
            except Exception as exc:  # not lost: JetStream redelivers it after AckWait
                log.warning("could not hand back job %s: %s", job.spec.job_id, exc)
            self._held.pop(id(job.msg), None)
            self._waiting.pop(id(job.msg), None)
            self._slots.release()
        log.info("%s handed back %d job(s) it had not started", self.name, len(jobs))

    def _handback_key(self, spec: JobSpec) -> str:
        return f"{spec.job_id}.{self.stage}"

    async def _handbacks_of(self, spec: JobSpec) -> int:
        """Deliveries of this task that ended in a hand-back, not a failure."""
        try:
            entry = await self._handbacks.get(self._handback_key(spec))
        except KeyNotFoundError:
            return 0
        return int(entry.value or 0)

    async def _send_loop(self) -> None:
        while True:
            job = await self._to_send.get()
            try:
                await self.emit(job)
                await job.msg.ack_sync()
                await asyncio.to_thread(self._delete_inputs, job.task)
            except Exception:
                # Not acked: JetStream redelivers after AckWait and the stage is replayed.
                log.exception("could not hand off job %s; it will be redelivered", job.spec.job_id)
            finally:
                self._held.pop(id(job.msg), None)
                self._slots.release()

    def _delete_inputs(self, task: StageTask) -> None:
        for ref in task.tensors.values():
            self.transports.delete(ref)

    # ----------------------------------------------------------------- outputs

    async def emit(self, job: Job) -> None:
        """Ship a finished job downstream. The decoder overrides this to publish the result."""
        spec = job.spec
        refs = await asyncio.to_thread(self._store_outputs, job)
        task = job.task.handed_on(refs, job.compute_s, job.batch_size)
        await bus.publish(self.js, work_subject(task.stage, spec.model), pack(task), task_msg_id(spec.job_id, task.stage))

    def _store_outputs(self, job: Job) -> dict:
        return {
            name: self.transports.put(f"{job.spec.job_id}.{self.stage}.{name}", tensor)
            for name, tensor in job.outputs.items()
        }

    async def publish_result(self, result: Result) -> None:
        await bus.publish(self.js, results_subject(result.job_id), pack(result), result_msg_id(result.job_id))

    async def reject(self, job_id: str, error: str, field: str | None = None) -> None:
        """Answer a job that cannot be done: an ``error`` event, then its error result."""
        log.warning("job %s rejected at %s: %s", job_id, self.stage, error)
        await self.publish_event(job_id, "error")
        await self.publish_result(Result.failed(job_id, error, self.stage, field))

    async def _fail(self, msg: Msg, job_id: str | None, error: str, field: str | None = None) -> None:
        """Answer a job that cannot be done with an error result, and terminate its message."""
        if job_id is not None:
            await self.reject(job_id, error, field)
        else:
            log.error("dropping an unreadable message with no job id (subject %s): %s", msg.subject, error)
        await msg.term()
        self._held.pop(id(msg), None)

    # ----------------------------------------------------------------- side channels

    async def publish_event(self, job_id: str, kind: str, **fields) -> None:
        event = ProgressEvent(job_id=job_id, kind=kind, stage=self.stage, **fields)
        await self._bus.nc.publish(events_subject(job_id), pack(event))

    async def _publish_timing(self, specs: list[JobSpec], seconds: float) -> None:
        sample = TimingSample(
            stage=self.stage, model=specs[0].model, worker=self.name, batch=len(specs), seconds=seconds, jobs=specs
        )
        await self._bus.nc.publish(metrics_subject(self.stage), pack(sample))

    async def _heartbeat_loop(self) -> None:
        """Tell JetStream that held messages are being worked on, so AckWait does not expire,
        and the container runtime that this worker is connected and consuming."""
        health = health_path()
        while True:
            if self._bus.nc.is_connected:
                await asyncio.to_thread(write_health, health, f"{self.name} serving {self.stage}")
            for msg in list(self._held.values()):
                try:
                    await msg.in_progress()
                except Exception as exc:
                    log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(min(self.settings.heartbeat_s, 5.0))

    async def _janitor_loop(self) -> None:
        while True:
            removed = await asyncio.to_thread(self.transports.shm.remove_expired, self.settings.blob_ttl_s)
            if removed:
                log.info("janitor removed %d expired tensor blobs", removed)
            await asyncio.sleep(min(60.0, self.settings.blob_ttl_s))


def main(stage: str, worker_class: type[StageWorker] = StageWorker) -> None:
    """Entry point of a stage service: ``python -m services.<name>``."""
    logging.basicConfig(
        level=os.environ.get("DF_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings()
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    asyncio.run(worker_class(stage, settings).run())
