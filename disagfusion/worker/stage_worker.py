"""The worker every stage service runs: ``StageWorker`` and the services' entry point ``main``."""

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
from operator import attrgetter

from nats.aio.msg import Msg
from nats.js.api import PubAck
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from disagfusion import bus, limits, media, metrics
from disagfusion.config import Settings
from disagfusion.cost import cost_key, sampled
from disagfusion.errors import DisagFusionError
from disagfusion.health import health_path, write_health, write_unhealthy
from disagfusion.job_state import JobsCancelled, JobStates, find_result, publish_cancelled
from disagfusion.models import load_stage_model
from disagfusion.models.base import SpecError, StageModel, Tensors, UnloadableModel
from disagfusion.presence import announce
from disagfusion.protocol import (
    DecodeError,
    JobSpec,
    ProgressEvent,
    ProgressKind,
    Result,
    Stage,
    StageTask,
    TimingSample,
    consumer_name,
    job_id_of_msg_id,
    events_subject,
    metrics_subject,
    output_object_name,
    outputs_bucket_name,
    pack,
    result_msg_id,
    results_subject,
    task_msg_id,
    tensor_key,
    unpack,
    work_subject,
)
from disagfusion.transport import open_transports
from disagfusion.worker import failures, policy, replay
from disagfusion.worker.checkpoints import Preempted
from disagfusion.worker.dead_letters import DeadLetters
from disagfusion.worker.envelope import check_envelope, foreign_job_id, msg_id_of
from disagfusion.worker.in_flight import InFlight

log = logging.getLogger(__name__)


class WorkerCrashed(DisagFusionError, RuntimeError):
    """One of a stage worker's loops ended while it was serving: the process must exit and be restarted."""

ModelLoader = Callable[[str, str, Settings], StageModel]
StageSeconds = dict[Stage, float]
"""Seconds a batch spent in each stage a worker ran it through, in pipeline order."""


@dataclass
class Job:
    """A task while this worker holds it."""

    msg: Msg
    task: StageTask
    inputs: Tensors = field(default_factory=dict)
    outputs: Tensors = field(default_factory=dict)
    compute_s: float = 0.0
    """This job's share of its batch's compute time in its task's stage."""
    batch_size: int = 1
    handed_on: StageTask | None = None
    """The next stage's task, once its tensors are stored."""

    @property
    def spec(self) -> JobSpec:
        return self.task.job


class StageWorker:
    """Serves one stage (encode, denoise or decode) of the models in ``DF_MODELS``.

    Each job goes through three parts joined by bounded queues::

        fetcher  ──▶  compute  ──▶  sender
        pull the task and      run the model in a     store outputs, publish
        load its input         thread, so the loop    downstream, ack the input,
        tensors                keeps fetching/sending  then delete the input tensors

    In ``async`` mode the three overlap: while job k computes, job k+1's tensors are being
    fetched and job k-1's outputs shipped, so handoffs hide behind compute. Which jobs share a
    batch is the service's rule (``batch_key``: by shape here; the encoder batches by model);
    how many, and when a busy worker takes its next job, are ``disagfusion.worker.policy``'s.

    Delivery: the input is acked only after the output's publish is acknowledged by JetStream,
    and input tensors are deleted only after that, so a crash at any point leaves the task to
    be redelivered and replayed. Publishes carry ``Nats-Msg-Id = <job_id>:<stage>`` so replays
    are harmless. Bad input (undecodable message, invalid spec, missing blob, too many
    deliveries) ends in an error result and a terminated message, never a redelivery loop.

    SIGTERM/SIGINT drain the worker: it stops pulling, hands back (nak) the jobs it fetched
    ahead but has not started, so that the instances that stay start them at once, finishes and
    acks the batch it is running, and exits.

    Options (``disagfusion.config.Settings``, from ``DF_*`` variables):

    - ``models``: the models served, one shared durable consumer each.
    - ``pipeline``: ``async`` overlaps fetch, compute and send; ``sync`` holds one job at a time.
    - ``max_in_flight``: jobs held at once from fetch to ack (at least two batches).
    - ``prefetch``: jobs queued for compute and outputs queued for sending.
    - ``max_batch``, ``max_batch_mpx``, ``max_batch_wait_ms``: how big a batch may grow, and how
      long its first job waits for more.
    - ``fetch_ahead_s``: a busy worker takes its next job only in the last this-many seconds of
      the work in hand (each job timed as the last of its shape here; an untimed shape counts
      as endless).
    - ``ack_wait_s``, ``heartbeat_s``: JetStream redelivers a task not acked within AckWait; the
      worker heartbeats what it holds, so only a dead worker's tasks are redelivered.
    - ``max_deliver``: deliveries (hand-backs not counted) before a task gets an error result.
    - ``drain_timeout_s``: how long a drain waits for the running batch before handing it back.
    - ``result_inline_max_bytes``: a result's outputs above this go to ``DF_OUTPUTS``.
    - ``worker_name``: the name in logs and timing samples (default ``<service>@<host>:<pid>:<id>``).
    - transport (``transport``, ``inline_max_bytes``, ``shm_dir``, ...) and model (``device``,
      ``dtype``, ``models_dir``, ...) settings are read by ``disagfusion.transport`` and
      ``disagfusion.models``.
    """

    batch_key: policy.BatchKey = staticmethod(policy.by_shape)
    """Jobs with equal keys may share a batch; a service overrides it (the encoder: by model)."""

    def __init__(self, stage: str, settings: Settings, load_model: ModelLoader = load_stage_model):
        self.stage = Stage(stage)
        self.settings = settings
        self.limits = policy.WorkerLimits.of(settings)
        self.admission = limits.Admission(self.stage, settings)
        # The random tail keeps names unique where host and pid are not: replicas of one
        # container image with host networking all run as the same pid on the same host name.
        self.name = settings.worker_name or (
            f"{self.stage.service}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        )
        self.model_names = settings.model_names
        self._load_model = load_model
        self.models: dict[str, StageModel] = {}
        self.transports = open_transports(settings)
        self._stopping = asyncio.Event()
        self._in_flight: InFlight | None = None
        self._dead_letters: DeadLetters | None = None
        self._job_states: JobStates | None = None
        self._replays: replay.Replays | None = None
        self._to_compute: asyncio.Queue[Job] = asyncio.Queue(maxsize=max(settings.prefetch, settings.max_batch))
        self._carried: list[Job] = []
        """Jobs taken for compute that did not fit the batch they came with, in order."""
        self._to_send: asyncio.Queue[Job] = asyncio.Queue(maxsize=settings.prefetch)
        self._bus: bus.Bus | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outputs: dict[str, ObjectStore] = {}
        """Object stores of large outputs by name, each opened by the first result too large to
        travel inline (``_outputs_bucket``)."""
        self._job_s: dict[tuple, float] = {}
        """Measured seconds per job, by ``cost.cost_key``: how long the jobs in hand take."""
        self._last_taken: JobSpec | None = None
        """The last job admitted: the next pull asks for a batch of jobs like it."""
        self._running: tuple[float, float] | None = None
        """The batch computing: (its estimated seconds, its perf_counter() start)."""
        self._progress = asyncio.Event()
        """Set when a batch starts or ends (or the worker stops): the work in hand changed."""
        self._pulling: dict[str, float] = {}
        """Model → when its fetch loop began the pull under way (absent while it waits for room)."""

    @property
    def js(self):
        assert self._bus is not None, "worker is not connected"
        return self._bus.js

    @property
    def held(self) -> int:
        """Tasks this worker holds now, from the pull that took them to their ack."""
        return 0 if self._in_flight is None else len(self._in_flight)

    @property
    def in_flight(self) -> InFlight:
        assert self._in_flight is not None, "worker is not connected"
        return self._in_flight

    # ----------------------------------------------------------------- lifecycle

    async def _load(self, name: str) -> StageModel:
        try:
            return await asyncio.to_thread(self._load_model, name, self.stage, self.settings)
        except SpecError as exc:
            log.error("%s cannot load model %s, and answers its jobs with this error: %s", self.name, name, exc)
            return UnloadableModel(self.stage, exc)

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or ``stop()``), then drain."""
        self._loop = loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        for name in self.model_names:
            self.models[name] = await self._load(name)
        self._bus = await bus.connect(self.settings, self.name)
        replicas = self.settings.stream_replicas
        self._in_flight = InFlight(self.settings.jobs_in_flight, self.stage, await bus.handbacks_bucket(self.js, replicas))
        self._dead_letters = DeadLetters(self.js, await bus.attempts_bucket(self.js, replicas), self.stage, self.name)
        self._job_states = await JobStates.open(self._bus, self.settings, self.name)
        self._replays = replay.Replays(self.js, self.stage, self.settings.max_input_replays, self.publish_event)
        if self._stopping.is_set():  # stopped while loading
            self._in_flight.close()
        await self.setup()
        subs = {name: await self._bind(name) for name in self.model_names}
        fetchers = [asyncio.create_task(self._fetch_loop(name, sub), name=f"fetch {name}") for name, sub in subs.items()]
        helpers = [
            asyncio.create_task(self._compute_loop(), name="compute"),
            asyncio.create_task(self._send_loop(), name="send"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._janitor_loop(), name="janitor"),
            asyncio.create_task(self.transports.locality.serve(self._bus.nc, self.name, self.stage, self.model_names),
                                name="locality"),
        ]
        log.info("%s serving %s for models %s (%s pipeline)", self.name, self.stage, self.model_names, self.settings.pipeline)
        stopping = asyncio.create_task(self._stopping.wait())
        await asyncio.wait([stopping, *fetchers, *helpers], return_when=asyncio.FIRST_COMPLETED)
        died = [task for task in (*fetchers, *helpers) if task.done()]
        if died and not self._stopping.is_set():
            await self._crash(died[0], fetchers, helpers)
        log.info("%s draining", self.name)
        await self._drain(fetchers)
        await self._close(helpers)
        log.info("%s stopped", self.name)

    async def _close(self, helpers: list[asyncio.Task]) -> None:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        await self._job_states.close()
        await self._bus.close()
        self.transports.close()

    async def _crash(self, died: asyncio.Task, fetchers: list[asyncio.Task], helpers: list[asyncio.Task]) -> None:
        """One of the worker's loops ended while it was serving: a bug, not a task's fault.
        Say so in the health file at once, hand back every task held (another instance runs
        them now, not after AckWait) and raise, so the process exits non-zero and its
        supervisor restarts it. A worker that went on without one of its loops would hold its
        tasks forever while looking alive."""
        exc = died.exception() if not died.cancelled() else None
        reason = f"{died.get_name()} loop of {self.name} ended: {failures.describe(exc) if exc else 'returned'}"
        log.critical("%s; the worker exits for its supervisor to restart it", reason, exc_info=exc)
        await asyncio.to_thread(write_unhealthy, health_path(), reason)
        self.stop()
        for task in (*fetchers, *helpers):
            task.cancel()
        await asyncio.gather(*fetchers, *helpers, return_exceptions=True)
        await self._hand_back(self._unstarted())
        await self.in_flight.drained(0)
        await self._close([])
        raise WorkerCrashed(reason) from exc

    def stop(self) -> None:
        self._stopping.set()
        self._progress.set()
        if self._in_flight is not None:
            self._in_flight.close()

    async def setup(self) -> None:
        """Hook for services that need more than the stage consumers (called once connected)."""

    async def _drain(self, fetchers: list[asyncio.Task]) -> None:
        """Stop pulling, hand back the jobs not started, wait for the running batch to be sent;
        hand back whatever outlasts the drain timeout.

        Scaling a stage down should move its queued work to the instances that stay at once,
        not keep it behind this one: a DiT holding three 14 s video jobs would take a minute to
        leave. JetStream redelivers a nak'd task before newer ones."""
        await self._hand_back(self._unstarted())  # also frees a fetcher blocked on a full queue
        await asyncio.gather(*fetchers, return_exceptions=True)
        await self._hand_back(self._unstarted())  # what the fetchers took meanwhile
        await self.in_flight.drained(self.settings.drain_timeout_s)

    # ----------------------------------------------------------------- the three parts

    async def _bind(self, model: str):
        """A pull subscription on the stage's durable consumer for ``model``, created if missing."""
        durable = await bus.ensure_consumer(self.js, self.stage, model, self.settings.ack_wait_s)
        return await self.js.pull_subscribe_bind(durable, bus.WORK_STREAM)

    async def _fetch_loop(self, model: str, sub) -> None:
        """Pull tasks for ``model`` until the worker stops. Nothing a pull or a task does ends
        this loop: a failed pull is retried (on a consumer recreated if it was deleted), and
        every failure of a task is answered by ``_admit``."""
        while not self._stopping.is_set():
            await self._until_fetch_ahead()  # waiting for room is not a stall: _pulling has no entry
            # As many tasks as there are free slots, up to a batch, so the inputs of several
            # jobs are fetched at once (a slow handoff then hides behind the others and compute).
            slots = await self.in_flight.reserve(policy.pull_size(self.limits, self._last_taken))
            if not slots:  # stopping
                break
            self._pulling[model] = time.monotonic()
            msgs = []
            try:
                msgs = await sub.fetch(slots, timeout=1.0)
            except TimeoutError:
                pass
            except Exception as exc:  # connection trouble (nats-py reconnects on its own) or no consumer
                log.warning("%s: pull for %s failed: %s", self.name, model, failures.describe(exc))
                await asyncio.sleep(0.5)
                sub = await self._rebound(model, sub)
            finally:
                self.in_flight.take(slots, msgs)
            admitted = await asyncio.gather(*(self._admit(msg) for msg in msgs))
            self._pulling.pop(model, None)  # a full compute queue below is backpressure, not a stall
            for job in admitted:
                if job is not None:
                    self._last_taken = job.spec
                    self.in_flight.admitted(job.msg, job.spec)
                    await self._to_compute.put(job)

    async def _rebound(self, model: str, sub):
        """``sub``, or a new subscription if the consumer was deleted (by an operator, or a
        JetStream that lost its state): without one the stage would never serve again."""
        try:
            await self.js.consumer_info(bus.WORK_STREAM, consumer_name(self.stage, model))
            return sub
        except NotFoundError:
            log.warning("%s: consumer %s is gone; recreating it", self.name, consumer_name(self.stage, model))
        except Exception as exc:  # NATS unreachable: keep the subscription, try again next pull
            log.warning("%s: cannot look up consumer %s: %s", self.name, consumer_name(self.stage, model), exc)
            return sub
        try:
            new = await self._bind(model)
        except Exception as exc:
            log.warning("%s: cannot recreate consumer %s: %s", self.name, consumer_name(self.stage, model), exc)
            return sub
        try:
            await sub.unsubscribe()
        except Exception:  # the old subscription's server side is gone already
            pass
        return new

    def _estimate(self, spec: JobSpec) -> float:
        """What a job takes here, as the last of its shape took: unknown (infinite) for a shape
        not run yet, so a worker does not take a second video job before it knows that the
        first takes 14 s."""
        return self._job_s.get(cost_key(self.stage, spec), math.inf)

    def _in_hand_s(self) -> float:
        """Estimated seconds until this worker has done what it holds."""
        running_left = 0.0
        if self._running is not None:
            estimate, started = self._running
            running_left = max(0.0, estimate - (time.perf_counter() - started))
        return policy.seconds_in_hand(running_left, self.in_flight.waiting(), self._estimate)

    async def _until_fetch_ahead(self) -> None:
        """Wait until the fetch-ahead rule lets this worker take its next job."""
        while not self._stopping.is_set():
            in_hand = self._in_hand_s()
            if policy.may_fetch_ahead(in_hand, self.limits):
                return
            self._progress.clear()
            try:
                timeout = None if math.isinf(in_hand) else in_hand - self.limits.fetch_ahead_s
                await asyncio.wait_for(self._progress.wait(), timeout=timeout)
            except TimeoutError:
                pass

    async def _admit(self, msg: Msg) -> Job | None:
        """Decode and check a task and load its inputs. Whatever fails is answered here (an
        error result, a dead letter or a delayed retry: ``failures``), so no task is left held
        and unanswered."""
        task: StageTask | None = None
        try:
            task = unpack(StageTask, msg.data)
            spec = task.job
            check_envelope(msg.subject, msg_id_of(msg), task)
            metrics.task_taken(self.stage, msg.metadata.num_delivered)
            if self._job_states.cancelled(spec.job_id):
                await self._drop_cancelled(msg, task)
                return None
            if msg.metadata.num_delivered > self.settings.max_deliver:
                failed = msg.metadata.num_delivered - await self.in_flight.handbacks_of(spec)
                if failed > self.settings.max_deliver:
                    cause = await self._dead_letters.last_unanswered(spec)
                    metrics.failed(self.stage, "gave_up")
                    metrics.job_left(self.stage, spec.model, "error")
                    await self._fail(msg, spec.job_id, f"stage {self.stage} gave up after {self.settings.max_deliver} "
                                     f"delivery attempts; the last: {cause}", dead_letter=True)
                    return None
            await self._dead_letters.taken(msg, spec)
            self.admission.check(task)
            model = self.models.get(spec.model)
            if model is None:
                raise SpecError("model", f"model {spec.model!r} is not served by this worker ({self.model_names})")
            model.check(spec)
            model.check_inputs(spec, task.tensors)
            inputs = await asyncio.to_thread(self.transports.get_all, task.tensors)
        except Exception as exc:
            await self._failed(msg, task, exc, f"input of stage {self.stage} unusable")
            return None
        await self.publish_event(spec.job_id, "stage_started")
        return Job(msg=msg, task=task, inputs=inputs)

    async def _failed(self, msg: Msg, task: StageTask | None, exc: Exception, doing: str) -> None:
        """Answer a task whose handling raised ``exc``: reject it, dead-letter it or retry it
        later, as ``failures.classify`` says. ``doing`` prefixes the cause in the error result.
        A job whose input vanished is run again from its first stage instead (``replay``)."""
        if replay.input_gone(exc, task):
            exc = await self._replays.send_back(msg, task, exc)
            if exc is None:
                self.in_flight.release(msg)
                return
        outcome = failures.classify(exc)
        metrics.failed(self.stage, outcome)
        if outcome is not failures.Outcome.RETRY or task is None:
            metrics.job_left(self.stage, task.job.model if task else "unknown", "error")
        if outcome is failures.Outcome.RETRY and task is not None:
            delay = failures.retry_delay(
                msg.metadata.num_delivered, self.settings.retry_delay_s, self.settings.retry_max_delay_s
            )
            log.warning("%s: job %s: %s: %s; retrying in %.1f s", self.name, task.job.job_id, doing,
                        failures.describe(exc), delay)
            await self.in_flight.hand_back(msg, task.job, delay)
            return
        dead = outcome is not failures.Outcome.REJECT
        if isinstance(exc, DecodeError):
            # Report spec problems by JobSpec field name ("steps", not "job.steps"), others by their path.
            field = exc.field.removeprefix("job.") if exc.field else None
            # A body too broken to name its job is answered through its required header's job id.
            job_id = exc.job_id or job_id_of_msg_id(msg_id_of(msg))
            await self._fail(msg, job_id, str(exc), field, dead_letter=dead)
            return
        user_error = isinstance(exc, (SpecError, limits.LimitError))
        field = exc.field if user_error else None
        if dead:
            log.error("%s: job %s: %s", self.name, task.job.job_id if task else None, doing, exc_info=exc)
        error = str(exc) if user_error else f"{doing}: {failures.describe(exc)}"
        await self._fail(msg, task.job.job_id if task else None, error, field, dead_letter=dead,
                         replay=replay.result_run(task) if task else 0)
        if task is not None:
            # A user's error (a spec, a limit, a deadline) is never rerun; a dead letter may be replayed.
            await self._answered_here(task, free_inputs=not dead)

    async def _answered_here(self, task: StageTask, free_inputs: bool) -> None:
        """``task``'s job got its result here (an error, or cancelled) and goes no further: its
        inputs are freed unless a dead letter's replay needs them, then ``job_ended``."""
        if free_inputs:
            await self._free_inputs(task)
        await self.job_ended(task)

    async def job_ended(self, task: StageTask) -> None:
        """``task``'s job was answered here (an error or cancelled result) and goes no further:
        a service that keeps state per job (the DiT's checkpoints) lets go of it. Nothing here."""

    async def _next_batch(self) -> list[Job]:
        """The next job plus, within ``max_batch_wait_ms``, more that fit its batch. Jobs that
        do not are carried, in order, to the following batches."""
        first = self._carried.pop(0) if self._carried else await self._to_compute.get()
        batch, self._carried = policy.split_batch([first, *self._carried], attrgetter("spec"), self.batch_key, self.limits)
        deadline = time.monotonic() + self.settings.max_batch_wait_ms / 1000
        while len(batch) < self.limits.max_batch:
            try:
                job = await asyncio.wait_for(self._to_compute.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
            joins = policy.fits([j.spec for j in batch], job.spec, self.batch_key, self.limits)
            (batch if joins else self._carried).append(job)
        return batch

    def run_batch(self, batch: list[Job]) -> tuple[list[Tensors], StageSeconds]:
        """Run a batch through this worker's stage (in a thread): each job's outputs, and the
        seconds the batch took. A service that runs several stages in one go overrides it."""
        specs = [job.spec for job in batch]
        started = time.perf_counter()
        outputs = self.models[specs[0].model].run(specs, [job.inputs for job in batch], self.on_step(batch))
        return outputs, {self.stage: time.perf_counter() - started}

    def on_step(self, batch: list[Job]) -> Callable[[int, int], None]:
        """The step callback of a batch of this worker's stage: its ``step`` events and cancel
        checks (``step_events``), and its jobs' deadlines (``limits.stop_when_late``)."""
        return limits.stop_when_late([job.task for job in batch], self.settings,
                                     self.step_events([job.spec for job in batch], self.stage))

    def step_events(self, specs: list[JobSpec], stage: Stage) -> Callable[[int, int], None]:
        """A model's step callback that publishes ``step`` events of ``stage`` for ``specs``."""

        job_ids = [spec.job_id for spec in specs]

        def on_step(step: int, total: int) -> None:
            self.notify(specs, "step", stage, step=step, total=total)
            self._job_states.stop_if_cancelled(job_ids, step, total)

        return on_step

    def notify(self, specs: list[JobSpec], kind: ProgressKind, stage: Stage, **fields) -> None:
        """Publish an event for each job from the compute thread (through the event loop)."""
        assert self._loop is not None, "worker is not running"
        for spec in specs:
            self._loop.call_soon_threadsafe(
                lambda j=spec.job_id: asyncio.ensure_future(self.publish_event(j, kind, stage=stage, **fields))
            )

    async def _compute_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if self._stopping.is_set():  # taken while draining: not started, so not ours to run
                await self._hand_back(batch)
                continue
            batch = await self._without_cancelled(batch)
            batch = [job for job in batch if not await self._late(job, f"before stage {self.stage} started it")]
            if not batch:
                continue
            specs = [job.spec for job in batch]
            for job in batch:
                self.in_flight.started(job.msg)
            started = time.perf_counter()
            self._running = (sum(map(self._estimate, specs)), started)
            self._progress.set()
            try:
                outputs, stage_seconds = await asyncio.to_thread(self.run_batch, batch)
            except JobsCancelled as stopped:  # every job of the batch: the loop stopped after a step
                for job in batch:
                    await self._drop_cancelled(job.msg, job.task, stopped.step, stopped.total)
                continue
            except Preempted as exc:  # checkpointed: the instance that takes them resumes there
                log.info("%s: %s; handing back its %d job(s)", self.name, exc, len(batch))
                await self._hand_back(batch)
                continue
            except Exception as exc:
                for job in batch:
                    await self._failed(job.msg, job.task, exc, f"stage {self.stage} failed")
                continue
            finally:
                self._running = None
                self._progress.set()
            seconds = time.perf_counter() - started
            for spec in specs:
                self._job_s[cost_key(self.stage, spec)] = seconds / len(specs)
            for stage, stage_s in stage_seconds.items():
                await self._publish_timing(stage, specs, stage_s)
            *earlier, last_s = stage_seconds.values()
            for job, output in zip(batch, outputs, strict=True):
                if self._job_states.cancelled(job.spec.job_id):  # its batch ran on for the others
                    await self._drop_cancelled(job.msg, job.task)
                    continue
                if await self._late(job, f"when stage {self.stage} finished it"):  # ran on in a batch with time left
                    continue
                # Stages run here before the last are handed on in-process: no tensors to store.
                for stage_s in earlier:
                    job.task = job.task.handed_on({}, stage_s / len(batch), len(batch))
                job.outputs, job.compute_s, job.batch_size = output, last_s / len(batch), len(batch)
                # Before the output is published, so a client never sees the result first.
                await self.publish_event(job.spec.job_id, "stage_done", stage=Stage(job.task.stage))
                await self._to_send.put(job)

    async def _without_cancelled(self, batch: list[Job]) -> list[Job]:
        """Drop the jobs cancelled while they waited for compute; the rest of the batch."""
        for job in batch:
            if self._job_states.cancelled(job.spec.job_id):
                await self._drop_cancelled(job.msg, job.task)
        return [job for job in batch if not self._job_states.cancelled(job.spec.job_id)]

    async def _drop_cancelled(self, msg: Msg, task: StageTask, step: int | None = None,
                              total: int | None = None) -> None:
        """Drop a cancelled job: its one result is ``cancelled`` (the canceller's, or published
        here), its task is terminated, and its input tensors deleted. If NATS cannot take that,
        the task is let go unterminated, and dropped again when it is redelivered after AckWait."""
        job_id = task.job.job_id
        where = f" after step {step} of {total}" if step is not None else ""
        log.info("%s: job %s is cancelled: dropped at %s%s", self.name, job_id, self.stage, where)
        try:
            result = await publish_cancelled(self.js, job_id, self.stage, self.name, replay.result_run(task))
            await msg.term()
        except Exception as exc:
            log.warning("%s: could not drop cancelled job %s (%s); it is redelivered after AckWait", self.name,
                        job_id, failures.describe(exc))
            return
        finally:
            self.in_flight.release(msg)
        metrics.job_left(self.stage, task.job.model, "cancelled")
        if result.status == "cancelled":
            self._job_states.dropped(job_id, self.stage, step, total)
        await self._answered_here(task, free_inputs=True)

    async def _late(self, job: Job, where: str) -> bool:
        """Answer ``job`` with its error result if it is past its deadline."""
        try:
            limits.check_deadline(job.task, self.settings, where)
        except limits.LimitError as exc:
            await self._failed(job.msg, job.task, exc, f"stage {self.stage}")
            self._progress.set()  # the work in hand changed: a fetcher may wait on it
            return True
        return False

    def _unstarted(self) -> list[Job]:
        """Take the jobs waiting for the compute loop out of its reach."""
        jobs, self._carried = self._carried, []
        while not self._to_compute.empty():
            jobs.append(self._to_compute.get_nowait())
        return jobs

    async def _hand_back(self, jobs: list[Job]) -> None:
        for job in jobs:
            await self.in_flight.hand_back(job.msg, job.spec)
        if jobs:
            log.info("%s handed back %d job(s) it had not started", self.name, len(jobs))

    async def _send_loop(self) -> None:
        while True:
            job = await self._to_send.get()
            if self._job_states.cancelled(job.spec.job_id):  # not shipped: it would only be dropped
                await self._drop_cancelled(job.msg, job.task)
                continue
            try:
                await self._send(job)
            except Exception as exc:
                doing = f"stage {self.stage} could not hand on its output"
                if failures.classify(exc) is failures.Outcome.DEAD and not failures.never_fits(exc):
                    # Unexpected here, after the compute, and likely the world's (a cluster
                    # failing over): not acked, so the task is redelivered and replayed after
                    # AckWait, as a counted delivery; if they run out, the job's error names this.
                    log.exception("%s: job %s: %s; it is redelivered", self.name, job.spec.job_id, doing)
                    await self._dead_letters.failed(job.msg, job.spec, f"{doing}: {failures.describe(exc)}")
                    self.in_flight.release(job.msg)
                else:
                    await self._failed(job.msg, job.task, exc, doing)
                continue
            self.in_flight.release(job.msg)
            metrics.job_left(job.task.stage, job.spec.model, "done")
            await self._free_inputs(job.task)

    async def _send(self, job: Job) -> None:
        """Ship a job's output and ack its task, retrying where Redis or NATS is briefly away:
        the compute is done and worth keeping. Retries in place last about an AckWait (the
        heartbeat keeps the task held meanwhile); a replayed publish is stored once."""
        give_up = time.monotonic() + self.settings.ack_wait_s
        attempt = 0
        while True:
            try:
                await self.emit(job)
                await job.msg.ack_sync()
                return
            except Exception as exc:
                attempt += 1
                delay = failures.retry_delay(attempt, self.settings.retry_delay_s, self.settings.retry_max_delay_s)
                if failures.classify(exc) is not failures.Outcome.RETRY or time.monotonic() + delay > give_up:
                    raise
                log.warning("%s: job %s: sending failed (%s); retrying in %.1f s", self.name, job.spec.job_id,
                            failures.describe(exc), delay)
                await asyncio.sleep(delay)

    async def _free_inputs(self, task: StageTask) -> None:
        """Delete the input tensors of a task this stage is done with."""
        try:
            await asyncio.to_thread(self._delete_inputs, task)
        except Exception as exc:  # the janitor (or Redis's TTL) frees them later
            log.warning("%s: could not free the inputs of job %s: %s", self.name, task.job.job_id, exc)

    def _delete_inputs(self, task: StageTask) -> None:
        for ref in task.tensors.values():
            self.transports.delete(ref)

    # ----------------------------------------------------------------- outputs

    async def emit(self, job: Job) -> None:
        """Ship a finished job downstream, or publish its result after the last stage."""
        if Stage(job.task.stage).is_last:
            await self._publish_output(job)
            return
        if job.handed_on is None:  # stored once: a retried send republishes the refs the first publish may have stored
            refs = await asyncio.to_thread(self._store_outputs, job)
            job.handed_on = job.task.handed_on(refs, job.compute_s, job.batch_size)
        task = job.handed_on
        await bus.publish(self.js, work_subject(task.stage, task.job.model), pack(task),
                          task_msg_id(task.job.job_id, task.stage, task.replay))

    async def _publish_output(self, job: Job) -> None:
        """The job's result: its pixels encoded as the job asks (``disagfusion.media``), inline
        or, when large, in ``DF_OUTPUTS``."""
        spec = job.spec
        # A video job's decoder hands on every frame; an image is a video of one frame here.
        frames = job.outputs["video" if "video" in job.outputs else "image"].numpy().reshape(
            -1, *job.outputs["image"].shape
        )
        fps = spec.fps or self.models[spec.model].fps
        encoded = await asyncio.to_thread(media.encode, frames, spec.output_encoding, fps)
        if len(encoded.data) <= self.settings.result_inline_max_bytes:
            where = {"data": encoded.data}
        else:
            outputs = await self._outputs_bucket(spec.job_id)
            name = output_object_name(spec.job_id, encoded.extension)
            await outputs.put(name, encoded.data)
            where = {"object_name": name}
        count = frames.shape[0]
        video = {"frames": count, "fps": fps, "duration_s": count / fps} if count > 1 else {}
        result = Result.ok(job.task, job.compute_s, job.batch_size, content_type=encoded.content_type,
                           height=frames.shape[1], width=frames.shape[2], **video, **where)
        await self.publish_event(spec.job_id, "done", stage=Stage(job.task.stage))
        if (await self.publish_result(result, replay.result_run(job.task))).duplicate and "object_name" in where:
            stored = await find_result(self.js, spec.job_id)
            if stored is not None and stored.status == "cancelled":  # the cancel's result came first: unread
                await outputs.delete(where["object_name"])

    async def _outputs_bucket(self, job_id: str) -> ObjectStore:
        """The bucket a job's large output goes to: ``DF_OUTPUTS`` or its tenant's own."""
        name = outputs_bucket_name(job_id)
        if name not in self._outputs:
            self._outputs[name] = await bus.outputs_bucket(self.js, self.settings, name)
        return self._outputs[name]

    def _store_outputs(self, job: Job) -> dict:
        return {
            name: self.transports.put(tensor_key(job.spec.job_id, self.stage, name), tensor,
                                      bound_for=(Stage(job.task.stage).next, job.spec.model))
            for name, tensor in job.outputs.items()
        }

    async def publish_result(self, result: Result, replay: int = 0) -> PubAck:
        """Publish a job's one result; ``replay``: the task's (``StageTask.replay``). The ack says
        ``duplicate`` when the job had a result already (a cancel's, or this one's before a crash)."""
        ack = await bus.publish(self.js, results_subject(result.job_id), pack(result), result_msg_id(result.job_id, replay))
        if not ack.duplicate:  # a duplicate's state was written with the first
            self._job_states.on_result(result)
        return ack

    async def reject(self, job_id: str, error: str, field: str | None = None, replay: int = 0) -> None:
        """Answer a job that cannot be done: an ``error`` event, then its error result."""
        log.warning("job %s rejected at %s: %s", job_id, self.stage, error)
        await self.publish_event(job_id, "error")
        await self.publish_result(Result.failed(job_id, error, self.stage, field), replay)

    async def _fail(self, msg: Msg, job_id: str | None, error: str, field: str | None = None,
                    dead_letter: bool = False, replay: int = 0) -> None:
        """Answer a task that cannot be done with an error result, copy it to the dead-letter
        stream if it failed for a reason other than the user's, and terminate it. If NATS
        cannot take all that, the task is let go unterminated: JetStream redelivers it after
        AckWait and it is judged again."""
        if job_id is not None and foreign_job_id(msg.subject, job_id) is not None:
            log.error("%s: not answering job %s, named on %s: %s", self.name, job_id, msg.subject, error)
            job_id = None
        try:
            if dead_letter:
                await self._dead_letters.send(msg, job_id, error)
            if job_id is not None:
                await self.reject(job_id, error, field, replay)
            else:
                log.error("dropping an unreadable message with no job id (subject %s): %s", msg.subject, error)
            await msg.term()
        except Exception as exc:
            log.warning("%s: could not answer job %s (%s); it is redelivered after AckWait", self.name, job_id,
                        failures.describe(exc))
        finally:
            self.in_flight.release(msg)

    # ----------------------------------------------------------------- side channels

    async def publish_event(self, job_id: str, kind: ProgressKind, stage: Stage | None = None, **fields) -> None:
        """Best effort, like progress events themselves: a lost event must not fail a job.
        ``stage`` defaults to this worker's."""
        event = ProgressEvent(job_id=job_id, kind=kind, stage=stage or self.stage, **fields)
        self._job_states.on_event(event)
        try:
            await self._bus.nc.publish(events_subject(job_id), pack(event))
        except Exception as exc:
            log.debug("event %s of job %s not sent: %s", kind, job_id, exc)

    async def _publish_timing(self, stage: Stage, specs: list[JobSpec], seconds: float) -> None:
        metrics.batch_computed(stage, specs[0].model, len(specs), seconds)
        sample = TimingSample(
            stage=stage, model=specs[0].model, worker=self.name, batch=len(specs), seconds=seconds, jobs=[sampled(s) for s in specs]
        )
        try:
            await self._bus.nc.publish(metrics_subject(stage), pack(sample))
        except Exception as exc:  # the scheduler misses one sample
            log.debug("timing sample not sent: %s", exc)

    async def _heartbeat_loop(self) -> None:
        """Tell JetStream that held messages are being worked on, so AckWait does not expire,
        and the container runtime that this worker is connected and consuming (or, at once,
        that it is not: ``_stalled``)."""
        health = health_path()
        while True:
            if self._bus.nc.is_connected:
                stalled = await self._stalled()
                if stalled:
                    log.error("%s is unhealthy: %s", self.name, stalled)
                    await asyncio.to_thread(write_unhealthy, health, stalled)
                else:
                    await asyncio.to_thread(write_health, health, f"{self.name} serving {self.stage}")
                    await announce(self._bus.nc, self.name, self.stage, self.model_names)
            for msg in self.in_flight.messages():
                try:
                    await msg.in_progress()
                except Exception as exc:
                    log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(min(self.settings.heartbeat_s, 5.0))

    async def _stalled(self) -> str | None:
        """Why this worker is not serving although it seems to, or None: a pull (with the
        loading of what it brought) has not come back for ``fetch_stall_s`` while tasks are
        queued for it."""
        now = time.monotonic()
        for model, since in list(self._pulling.items()):
            if now - since < self.settings.fetch_stall_s:
                continue
            try:
                info = await self.js.consumer_info(bus.WORK_STREAM, consumer_name(self.stage, model))
            except Exception:  # cannot tell now; the next round asks again
                continue
            if info.num_pending:
                return (f"{self.name} has not fetched from {info.name} for {now - since:.0f} s "
                        f"while {info.num_pending} task(s) wait there")
        return None

    async def _janitor_loop(self) -> None:
        while True:
            try:
                removed = await asyncio.to_thread(self.transports.sweep)
            except Exception as exc:  # a store briefly away: the next round sweeps it
                log.warning("janitor round failed: %s", failures.describe(exc))
            else:
                if removed:
                    log.info("janitor removed %d expired tensor blobs", removed)
            await asyncio.sleep(min(60.0, self.settings.blob_ttl_s))


def main(stage: str, worker_class: type[StageWorker] = StageWorker) -> None:
    """Entry point of a stage service: ``python -m services.<name>``."""
    logging.basicConfig(
        level=os.environ.get("DF_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings()
    metrics.serve(settings, stage)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    asyncio.run(worker_class(stage, settings).run())
