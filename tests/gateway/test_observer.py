"""The dashboard's view of the bus: jobs, results and worker presence as they arrive, the
rolling window behind throughput and p95, and its subscriptions on a real nats-server."""

from __future__ import annotations

import asyncio
import time

import nats

from disagfusion.presence import Presence, announce
from disagfusion.protocol import JobSpec, Result, StageTask, pack, results_subject, work_subject
from services.gateway.observer import BUCKET_S, WINDOW_S, Observer, p95


def task(job_id: str, submitted_at: float) -> StageTask:
    return StageTask(job=JobSpec(job_id=job_id, prompt="a kite"), stage="encode", submitted_at=submitted_at)


def result(job_id: str, finished_at: float, status: str = "ok", submitted_at: float | None = None) -> Result:
    return Result(job_id=job_id, status=status, finished_at=finished_at, submitted_at=submitted_at,
                  content_type="image/png" if status == "ok" else None, error=None if status == "ok" else "boom")


def test_p95_is_the_nearest_rank() -> None:
    assert p95([]) is None
    assert p95([3.0]) == 3.0
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([1.0, 2.0, 10.0]) == 10.0


def test_results_are_counted_once_with_their_latency() -> None:
    now = time.time()
    observer = Observer()
    observer.submitted(task("a", now - 10))
    observer.submitted(task("a", now - 5))  # a redelivery: the first sighting counts
    observer.finished_job(result("a", now - 4).model_copy(update={"data": b"png bytes"}))
    observer.finished_job(result("a", now - 4))  # a replayed publish
    observer.finished_job(result("b", now - 1, status="error", submitted_at=now - 3))  # submitted before we listened
    assert (observer.completed, observer.failed) == (1, 1)
    assert [f.latency_s for f in observer.window(now)] == [6.0, 2.0]
    recent = observer.recent(10)
    assert [job.job_id for job in recent] == ["b", "a"]  # newest first
    assert recent[0].model is None and recent[1].model == "tiny"
    assert recent[1].result.data is None  # inline output bytes are not kept


def test_the_window_drops_old_results_and_buckets_the_rest() -> None:
    now = time.time()
    observer = Observer()
    observer.started_at = now - 2 * WINDOW_S
    for i, age in enumerate((WINDOW_S + 5, 90.0, 30.0, 20.0, 1.0)):
        observer.submitted(task(f"j{i}", now - age - 2.0))
        observer.finished_job(result(f"j{i}", now - age))
    assert len(observer.window(now)) == 4  # the oldest fell out
    assert observer.throughput_per_min(now) == 3.0  # three in the last minute
    starts, rates, latencies = observer.series(now)
    assert len(starts) == WINDOW_S / BUCKET_S and starts == sorted(starts) and starts[-1] <= now < starts[-1] + BUCKET_S
    assert sum(rates) * BUCKET_S / 60 == 4
    assert [value for value in latencies if value is not None] == [2.0] * sum(1 for r in rates if r)
    observer.started_at = now - 25.0  # buckets before the gateway listened are unknown, not 0
    _, rates, _ = observer.series(now)
    assert rates[:-4] == [None] * (len(rates) - 4) and None not in rates[-3:]


def test_workers_not_heard_from_are_gone() -> None:
    now = time.time()
    observer = Observer()
    observer.present(Presence(worker="dit@a", stage="denoise", models=["tiny"], t=now - 1))
    observer.present(Presence(worker="dit@b", stage="denoise", models=["tiny"], t=now - 60))
    observer.present(Presence(worker="encoder@a", stage="encode", models=["tiny"], t=now))
    assert observer.running(now) == {"encode": 1, "denoise": 1, "decode": 0}


async def test_listens_on_the_bus_and_ignores_garbage(nats_server: str) -> None:
    nc = await nats.connect(nats_server)
    observer = Observer()
    listening = asyncio.create_task(observer.listen(nc))
    try:
        await asyncio.sleep(0.2)  # subscribed
        now = time.time()
        await nc.publish(work_subject("encode", "tiny"), b"not msgpack")
        await nc.publish(work_subject("encode", "tiny"), pack(task("j1", now)))
        await nc.publish(results_subject("j1"), pack(result("j1", now + 0.5)))
        await nc.publish(results_subject("j2"), b"\x92garbage")
        await announce(nc, "decoder@x", "decode", ["tiny"])
        await nc.flush()
        for _ in range(50):
            if observer.completed and observer.workers:
                break
            await asyncio.sleep(0.05)
        assert observer.completed == 1 and [job.job_id for job in observer.recent(5)] == ["j1"]
        assert observer.running(time.time())["decode"] == 1
    finally:
        listening.cancel()
        await nc.close()
