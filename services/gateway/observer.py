"""What the gateway sees go by on the bus, for the dashboard: every job entering the pipeline
(``df.work.encode.*``, also those a batch pipeline publishes straight to NATS), every result
(``df.results.*``) and every worker's presence (``df.presence.*``). Core NATS subscriptions
made once connected: nothing is replayed, so the window starts when the gateway does."""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from disagfusion.presence import PRESENCE_MAX_AGE_S, PRESENCE_SUBJECTS, Presence
from disagfusion.protocol import STAGES, DecodeError, Result, StageTask, results_subject, unpack, work_subject

WINDOW_S = 300.0
"""How far back throughput and latency are counted, and the chart reaches."""
BUCKET_S = 10.0
"""The chart's resolution."""
RATE_S = 60.0
"""Throughput is the results of the last minute."""
MAX_JOBS = 1000
"""Jobs remembered (for the recent-jobs list and the latency of their results); oldest go first."""


@dataclass
class SeenJob:
    job_id: str
    model: str | None
    prompt: str | None
    submitted_at: float
    result: Result | None = None


@dataclass
class Finished:
    at: float
    latency_s: float


def p95(values: list[float]) -> float | None:
    """The nearest-rank 95th percentile; None for no values."""
    if not values:
        return None
    ranked = sorted(values)
    return ranked[math.ceil(0.95 * len(ranked)) - 1]


class Observer:
    def __init__(self) -> None:
        self.started_at = time.time()
        self.jobs: OrderedDict[str, SeenJob] = OrderedDict()
        self.finished: deque[Finished] = deque()
        self.workers: dict[str, Presence] = {}
        self.completed = 0
        self.failed = 0

    # ------------------------------------------------------------------ what arrives

    def submitted(self, task: StageTask) -> None:
        if task.job.job_id in self.jobs:  # a redelivery or a hand-back: the job was seen already
            return
        self.jobs[task.job.job_id] = SeenJob(task.job.job_id, task.job.model, task.job.prompt, task.submitted_at)
        self._forget_oldest()

    def finished_job(self, result: Result) -> None:
        job = self.jobs.get(result.job_id)
        if job is None:  # submitted before this gateway started listening
            submitted_at = result.submitted_at or result.finished_at
            job = self.jobs[result.job_id] = SeenJob(result.job_id, None, None, submitted_at)
            self._forget_oldest()
        if job.result is not None:  # a result published again (a replayed publish): count it once
            return
        job.result = result.model_copy(update={"data": None})  # up to 512 KiB inline: not kept for a thousand jobs
        if result.status == "ok":
            self.completed += 1
        else:
            self.failed += 1
        self.finished.append(Finished(result.finished_at, max(0.0, result.finished_at - job.submitted_at)))

    def present(self, presence: Presence) -> None:
        self.workers[presence.worker] = presence

    def _forget_oldest(self) -> None:
        while len(self.jobs) > MAX_JOBS:
            self.jobs.popitem(last=False)

    # ------------------------------------------------------------------ what the dashboard reads

    def running(self, now: float) -> dict[str, int]:
        """Stage → workers heard from within PRESENCE_MAX_AGE_S."""
        for name in [name for name, p in self.workers.items() if now - p.t > PRESENCE_MAX_AGE_S]:
            del self.workers[name]
        counts = {str(stage): 0 for stage in STAGES}
        for presence in self.workers.values():
            counts[presence.stage] = counts.get(presence.stage, 0) + 1
        return counts

    def window(self, now: float) -> list[Finished]:
        while self.finished and now - self.finished[0].at > WINDOW_S:
            self.finished.popleft()
        return list(self.finished)

    def throughput_per_min(self, now: float) -> float:
        """Results of the last minute (of the time since the gateway started, in its first minute) per minute."""
        span = min(RATE_S, max(now - self.started_at, 1.0))
        return sum(1 for f in self.window(now) if now - f.at <= span) * 60.0 / span

    def series(self, now: float) -> tuple[list[float], list[float | None], list[float | None]]:
        """The chart: for each BUCKET_S bucket of the window, its start, results per minute (None
        before the gateway listened: not seen is not zero) and p95 latency."""
        last = math.floor(now / BUCKET_S) * BUCKET_S
        starts = [last - BUCKET_S * i for i in reversed(range(int(WINDOW_S / BUCKET_S)))]
        latencies: dict[float, list[float]] = {start: [] for start in starts}
        for f in self.window(now):
            start = math.floor(f.at / BUCKET_S) * BUCKET_S
            if start in latencies:
                latencies[start].append(f.latency_s)
        rates = [len(latencies[start]) * 60.0 / BUCKET_S if start + BUCKET_S > self.started_at else None
                 for start in starts]
        return starts, rates, [p95(latencies[start]) for start in starts]

    def recent(self, count: int) -> list[SeenJob]:
        return list(reversed(list(self.jobs.values())[-count:]))

    # ------------------------------------------------------------------ listening

    async def listen(self, nc: NatsClient) -> None:
        """Subscribe, then wait to be cancelled; the subscriptions last as long as the connection
        (nats-py renews them on reconnects) and end when the backend closes it."""
        handlers = {
            work_subject(str(STAGES[0]), "*"): lambda msg: self.submitted(unpack(StageTask, msg.data)),
            results_subject("*"): lambda msg: self.finished_job(unpack(Result, msg.data)),
            PRESENCE_SUBJECTS: lambda msg: self.present(unpack(Presence, msg.data)),
        }
        for subject, handle in handlers.items():

            async def on_message(msg: Msg, handle=handle) -> None:
                try:
                    handle(msg)
                except DecodeError:  # a malformed message: its stage answers it; nothing to show
                    pass

            await nc.subscribe(subject, cb=on_message)
        await asyncio.Event().wait()
