"""The in-flight ledger: every task a stage worker holds, from the pull that takes it to its end.

A task ends in exactly one of three ways: acked (its output is published), terminated (it got
an error result) or handed back (nak'd, for another instance to start at once, or after a delay
when Redis or NATS was briefly away), and
each of them goes through ``release``, the one place a slot comes free. The ledger bounds how
many tasks a worker holds (``capacity`` slots), knows which are admitted but not started (the
fetch-ahead rule estimates them), and counts hand-backs in the KV bucket ``DF_HANDBACKS`` so
that a task moved by scale-downs is not mistaken for one that keeps failing.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from disagfusion import metrics
from disagfusion.protocol import JobSpec, handback_key

log = logging.getLogger(__name__)


class InFlight:
    def __init__(self, capacity: int, stage: str, handbacks: KeyValue):
        self.capacity = capacity
        self.stage = stage
        self._handbacks = handbacks
        self._reserved = 0
        """Slots promised to pulls under way."""
        self._held: dict[int, Msg] = {}
        """Tasks taken and not yet ended (keyed by id: Msg is unhashable)."""
        self._waiting: dict[int, JobSpec] = {}
        """Tasks admitted and not yet started (keyed like ``_held``)."""
        self._changed = asyncio.Event()
        self._turns = asyncio.Lock()
        """Pulls wait for slots in turn (asyncio.Lock is FIFO): a worker serving several models
        has a pull loop per model, and one that has just given slots back must not take them
        again before the loops already waiting, or a model can wait forever."""
        self._closed = False
        metrics.IN_FLIGHT.labels(stage).set_function(self.__len__)  # read at scrape time

    @property
    def free(self) -> int:
        return self.capacity - self._reserved - len(self._held)

    def __len__(self) -> int:
        return len(self._held)

    def messages(self) -> list[Msg]:
        """The tasks held now (for in-progress heartbeats)."""
        return list(self._held.values())

    def waiting(self) -> list[JobSpec]:
        """The jobs admitted and not yet started."""
        return list(self._waiting.values())

    # ------------------------------------------------------------------ taking tasks

    async def reserve(self, most: int) -> int:
        """Wait for a free slot, then reserve every free one up to ``most`` for one pull; 0 once
        the worker stops taking work (``close``)."""
        async with self._turns:
            while not self._closed and self.free <= 0:
                self._changed.clear()
                await self._changed.wait()
            if self._closed:
                return 0
            slots = min(self.free, most)
            self._reserved += slots
            return slots

    def take(self, reserved: int, msgs: list[Msg]) -> None:
        """The pull for ``reserved`` slots brought ``msgs``: they are held now, and the slots
        it did not fill are free again."""
        self._reserved -= reserved
        for msg in msgs:
            self._held[id(msg)] = msg
        if len(msgs) < reserved:
            self._changed.set()

    def admitted(self, msg: Msg, spec: JobSpec) -> None:
        """``msg`` passed its checks and waits for the compute loop."""
        self._waiting[id(msg)] = spec

    def started(self, msg: Msg) -> None:
        self._waiting.pop(id(msg), None)

    def close(self) -> None:
        """Take no more tasks: pulls waiting for a slot give up. Tasks held still end as usual."""
        self._closed = True
        self._changed.set()

    # ------------------------------------------------------------------ ending tasks

    def release(self, msg: Msg) -> None:
        """``msg`` has ended (acked, terminated or handed back): its slot is free."""
        self._held.pop(id(msg), None)
        self._waiting.pop(id(msg), None)
        self._changed.set()

    async def hand_back(self, msg: Msg, spec: JobSpec, delay_s: float | None = None) -> None:
        """Return an unstarted task to the queue, where another instance takes it before newer
        ones (or, with ``delay_s``, that much later: a retry after a brief outage), and count
        the hand-back so it does not count as a failed delivery."""
        try:
            handed = await self.handbacks_of(spec)
            await self._handbacks.put(handback_key(spec.job_id, self.stage), str(handed + 1).encode())
            await msg.nak(delay=delay_s)
            metrics.HANDBACKS.labels(self.stage).inc()
        except Exception as exc:  # not lost: JetStream redelivers it after AckWait
            log.warning("could not hand back job %s: %s", spec.job_id, exc)
        self.release(msg)

    async def handbacks_of(self, spec: JobSpec) -> int:
        """Deliveries of this task that ended in a hand-back, not a failure."""
        try:
            entry = await self._handbacks.get(handback_key(spec.job_id, self.stage))
        except KeyNotFoundError:
            return 0
        return int(entry.value or 0)

    async def drained(self, timeout_s: float) -> None:
        """Wait until every held task has ended, or ``timeout_s`` has passed; then nak what is
        left, which JetStream redelivers to another instance at once (a delivery it counts)."""
        deadline = time.monotonic() + timeout_s
        while self._held and (left := deadline - time.monotonic()) > 0:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                break
        for msg in self.messages():
            try:
                await msg.nak()
            except Exception as exc:  # not lost: JetStream redelivers it after AckWait
                log.warning("could not hand back a task: %s", exc)
            self.release(msg)
