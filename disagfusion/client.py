"""Submit jobs and collect their results: what the CLI, the gateway and batch pipelines use.

    async with Client(settings) as client:
        result = await client.generate(JobSpec(prompt="a red fox"))
        png = await client.output(result)

``run_many`` streams results of a whole batch as they finish, through one consumer on
``df.results.>`` created before the first job is published, so no result can be missed.

A tenant's client (``DF_TENANT``) submits in its own namespace: its job ids are qualified
``<tenant>.<id>``, and it reads results by subject, the only way its permissions allow
(docs/security.md "Tenants").
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing

from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from disagfusion import bus, job_state, limits
from disagfusion.config import BusSettings, LimitSettings
from disagfusion.errors import DisagFusionError
from disagfusion.protocol import (
    JobSpec,
    JobState,
    ProgressEvent,
    Result,
    Stage,
    StageTask,
    events_subject,
    outputs_bucket_name,
    pack,
    qualified,
    results_subject,
    task_msg_id,
    tenant_of,
    unpack,
    work_subject,
)


log = logging.getLogger(__name__)

OBJECT_NAME = re.compile(r"([A-Za-z0-9_-]{1,64}\.)?[A-Za-z0-9_-]{1,64}\.[a-z0-9]{1,8}")
"""A DF_OUTPUTS object name as stages make them (``<job_id>.<extension>``): nothing a caller that
saves outputs under their names could turn into a path."""

POLL_S = 5.0
"""A tenant's client looks up the stored results of the jobs it waits for this often, besides
hearing them live: one published while NATS was away is found this way."""

MAX_FILTERED_JOBS = 256
"""``run_many`` of up to this many jobs filters its consumer to their result subjects (the
consumer's config must fit in one NATS message); a larger batch reads every new result."""


class JobTimeout(DisagFusionError, TimeoutError):
    """No result came within the time a caller was willing to wait."""


class Client:
    def __init__(self, settings: BusSettings | None = None, name: str = "client", limits: LimitSettings | None = None):
        self.settings = settings or BusSettings()
        self.name = name
        """Who this client is in the job states it writes (``JobState.by``)."""
        self.limits = limits or (self.settings if isinstance(self.settings, LimitSettings) else LimitSettings())
        """What a job may ask for: checked here before it is queued (``disagfusion.limits``)."""
        self._bus: bus.Bus | None = None
        self._jobs: KeyValue | None = None

    async def __aenter__(self) -> Client:
        self._bus = await bus.connect(self.settings, "disagfusion-client")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._bus is not None
        await self._bus.close()

    @property
    def bus(self) -> bus.Bus:
        """The connection, for callers that also read the queues (the gateway)."""
        assert self._bus is not None, "use Client as an async context manager"
        return self._bus

    @property
    def _js(self):
        return self.bus.js

    async def jobs_bucket(self) -> KeyValue:
        """``DF_JOBS``, the job states (``disagfusion.job_state``)."""
        if self._jobs is None:
            self._jobs = await bus.jobs_bucket(self._js, self.settings)
        return self._jobs

    @property
    def tenant(self) -> str:
        """The tenant this client submits as (``DF_TENANT``); empty: the shared namespace."""
        return self.settings.tenant

    def _own(self, spec: JobSpec) -> JobSpec:
        """``spec`` as this client submits it: a tenant's with its job id qualified,
        ``<tenant>.<id>``. Raises ValueError for a job id in another tenant's namespace."""
        if not self.tenant:
            return spec
        return spec.model_copy(update={"job_id": self._job_id(spec.job_id)})

    def _job_id(self, job_id: str) -> str:
        """A job id as this client means it: a tenant's own ids may be given unqualified."""
        if not self.tenant:
            return job_id
        other = tenant_of(job_id)
        if other not in (None, self.tenant):
            raise ValueError(f"job_id {job_id!r} is tenant {other!r}'s; this client is tenant {self.tenant!r}")
        return qualified(job_id, self.tenant)

    async def submit(self, spec: JobSpec) -> str:
        """Queue a job; returns its id (a tenant's: qualified). Submitting the same job id twice
        queues it once. Raises ``LimitError`` for a job over a limit and ``QueueFull`` while the
        queue is full."""
        spec = self._own(spec)
        await self._admit([spec])
        await self._publish(spec)
        return spec.job_id

    async def state(self, job_id: str) -> JobState | None:
        """A job's latest state in ``DF_JOBS`` (None if it has none)."""
        return await job_state.read_state(await self.jobs_bucket(), self._job_id(job_id))

    async def cancel(self, job_id: str, known: bool = False) -> Result | None:
        """Cancel a job (``job_state.cancel``): its one result after the cancel (``cancelled``,
        or the result it finished with first), None for a job nobody knows (``known``: the
        caller submitted it, so it exists even without a state). Raises ``CancelPending`` when
        no stage answers: the job is marked, and the stage that takes it answers it."""
        return await job_state.cancel(self.bus, self.settings, self._job_id(job_id), self.name, known)

    async def _admit(self, specs: list[JobSpec]) -> None:
        for spec in specs:
            limits.check_job(spec, self.limits)
        await limits.check_queue_depth(self._js, self.settings, len(specs))

    async def _publish(self, spec: JobSpec) -> None:
        """Publish a job (a retry of the same job is stored once), after claiming its id:
        ``JobIdInUse`` if another job has it."""
        try:
            await job_state.claim(await self.jobs_bucket(), spec)
        except job_state.JobIdInUse:
            raise
        except Exception as exc:  # DF_JOBS unreachable: publish unchecked (a duplicate is still stored once)
            log.debug("job %s: id not claimed: %s", spec.job_id, exc)
        task = StageTask(job=spec, stage=Stage.ENCODE)
        try:
            await bus.publish(self._js, work_subject(Stage.ENCODE, spec.model, self.tenant or None), pack(task),
                              task_msg_id(spec.job_id, Stage.ENCODE))
        except Exception as exc:
            if limits.stream_full(exc):
                raise limits.QueueFull(f"the work stream is full ({exc.description}; DF_WORK_MAX_MSGS, "
                                       "DF_WORK_MAX_BYTES): retry later") from exc
            raise
        try:
            await job_state.mark_queued(await self.jobs_bucket(), spec.job_id, self.name)
        except Exception as exc:  # the state is best effort; the job is queued
            log.debug("job %s: no queued state: %s", spec.job_id, exc)

    async def result(self, job_id: str, timeout: float = 600.0) -> Result:
        """Wait for a job's result (also one that was published before this call). JetStream
        that does not answer for a while (a cluster electing a new leader, about 10 s) is waited
        out within ``timeout``."""
        job_id = self._job_id(job_id)
        if self.tenant:
            async with aclosing(self._tenant_results({job_id}, timeout)) as results:
                async for result in results:
                    return result
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            sub = await bus.wait_out_unavailable(
                lambda: self._js.subscribe(results_subject(job_id), ordered_consumer=True), timeout)
        except bus.JETSTREAM_UNAVAILABLE:
            raise JobTimeout(f"JetStream did not answer within {timeout:.0f} s asking for job {job_id}'s result") from None
        try:
            msg = await sub.next_msg(timeout=max(deadline - asyncio.get_running_loop().time(), 0.1))
        except TimeoutError:
            raise JobTimeout(f"no result for job {job_id} within {timeout:.0f} s") from None
        finally:
            await sub.unsubscribe()
        return unpack(Result, msg.data)

    async def lookup(self, job_id: str) -> Result | None:
        """A job's result if it has one now; None while the job runs (or for a job nobody submitted)."""
        return await job_state.find_result(self._js, self._job_id(job_id))

    async def generate(
        self, spec: JobSpec, on_event: Callable[[ProgressEvent], None] | None = None, timeout: float = 600.0
    ) -> Result:
        """Submit one job and wait for its result, reporting progress events as they come."""
        spec = self._own(spec)
        events = None
        if on_event is not None:

            async def deliver(msg) -> None:
                on_event(unpack(ProgressEvent, msg.data))

            events = await self._bus.nc.subscribe(events_subject(spec.job_id), cb=deliver)
        try:
            await self.submit(spec)
            return await self.result(spec.job_id, timeout)
        finally:
            if events is not None:
                await events.drain()  # deliver the events that arrived before the result

    async def run_many(self, specs: Iterable[JobSpec], timeout: float = 600.0) -> AsyncIterator[Result]:
        """Submit every job, then yield results in completion order until each job has one.

        Raises JobTimeout if ``timeout`` seconds pass without any new result."""
        specs = [self._own(spec) for spec in specs]
        pending = {spec.job_id for spec in specs}
        if self.tenant:
            async with aclosing(self._tenant_results(pending, timeout, lambda: self._submit_all(specs))) as results:
                async for result in results:
                    yield result
            return
        # A small batch's consumer is sent only its own results, so many callers at once (the
        # gateway's requests) do not each receive every result; a large one reads them all.
        own = ConsumerConfig(filter_subjects=[results_subject(job_id) for job_id in pending])
        sub = await self._js.subscribe(
            "df.results.>", ordered_consumer=True, deliver_policy=DeliverPolicy.NEW,
            config=own if len(pending) <= MAX_FILTERED_JOBS else None,
        )
        try:
            await self._submit_all(specs)
            while pending:
                try:
                    msg = await sub.next_msg(timeout=timeout)
                except TimeoutError:
                    raise JobTimeout(f"{len(pending)} jobs got no result within {timeout:.0f} s") from None
                result = unpack(Result, msg.data)
                if result.job_id in pending:
                    pending.discard(result.job_id)
                    yield result
        finally:
            await sub.unsubscribe()

    async def _submit_all(self, specs: list[JobSpec]) -> None:
        await self._admit(specs)
        await asyncio.gather(*(self._publish(spec) for spec in specs))

    async def _tenant_results(self, pending: set[str], timeout: float,
                              submit: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[Result]:
        """Results of a tenant's ``pending`` jobs as they come: heard on ``df.results.<tenant>.*``
        (subscribed before ``submit`` runs) and looked up by subject every ``POLL_S`` (a result
        stored before the subscription, or while NATS was away). A tenant may not create the
        consumers ``run_many`` uses otherwise: their subject filter is in the request's body.
        Raises JobTimeout if ``timeout`` seconds pass without any new result."""
        arrived: asyncio.Queue[bytes] = asyncio.Queue()

        async def hear(msg) -> None:
            arrived.put_nowait(msg.data)

        sub = await self.bus.nc.subscribe(results_subject(qualified("*", self.tenant)), cb=hear)
        loop = asyncio.get_running_loop()
        try:
            if submit is not None:
                await submit()
            last_new = next_poll = loop.time()
            while pending:
                found: list[Result] = []
                if loop.time() >= next_poll:
                    next_poll = loop.time() + POLL_S
                    for job_id in sorted(pending):
                        try:
                            result = await job_state.find_result(self._js, job_id)
                        except bus.JETSTREAM_UNAVAILABLE:
                            break  # looked up again at the next poll
                        if result is not None:
                            found.append(result)
                if not found:
                    try:
                        found.append(unpack(Result, await asyncio.wait_for(arrived.get(), 1.0)))
                    except TimeoutError:
                        pass
                while not arrived.empty():
                    found.append(unpack(Result, arrived.get_nowait()))
                for result in found:
                    if result.job_id in pending:
                        pending.discard(result.job_id)
                        last_new = loop.time()
                        yield result
                if pending and loop.time() - last_new > timeout:
                    raise JobTimeout(f"{len(pending)} jobs got no result within {timeout:.0f} s")
        finally:
            await sub.unsubscribe()

    async def output(self, result: Result) -> bytes:
        """The output bytes of a successful result, wherever they were put."""
        if result.status != "ok":
            raise ValueError(f"job {result.job_id} failed: {result.error}")
        if result.data is not None:
            return result.data
        if not OBJECT_NAME.fullmatch(result.object_name or ""):
            raise ValueError(f"job {result.job_id}: output object name {result.object_name!r} is malformed")
        bucket = await bus.outputs_bucket(self._js, self.settings, outputs_bucket_name(result.job_id))
        return (await bucket.get(result.object_name)).data
