"""The in-flight ledger's slots: reserved by pulls, held by tasks, freed in one place."""

from __future__ import annotations

import asyncio

from disagfusion.worker.in_flight import InFlight


class Task:
    """Stands in for a NATS message: the ledger only keeps and counts them."""


async def test_slots_are_reserved_taken_and_released() -> None:
    ledger = InFlight(capacity=4, stage="denoise", handbacks=None)  # hand-backs are not used here
    assert await ledger.reserve(8) == 4  # every free slot, for one pull
    first, second = Task(), Task()
    ledger.take(4, [first, second])  # the pull brought two: the other two slots are free again
    assert len(ledger) == 2 and ledger.free == 2
    assert await ledger.reserve(1) == 1
    ledger.take(1, [])
    ledger.release(first)
    assert len(ledger) == 1 and ledger.free == 3


async def test_a_pull_waits_for_a_slot_and_gives_up_when_the_worker_stops() -> None:
    ledger = InFlight(capacity=1, stage="denoise", handbacks=None)
    task = Task()
    ledger.take(await ledger.reserve(1), [task])
    waiting = asyncio.create_task(ledger.reserve(1))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    ledger.release(task)
    assert await asyncio.wait_for(waiting, 1) == 1
    ledger.take(1, [])
    ledger.take(await ledger.reserve(1), [Task()])
    stopping = asyncio.create_task(ledger.reserve(1))
    ledger.close()
    assert await asyncio.wait_for(stopping, 1) == 0


async def test_pulls_take_free_slots_in_turn() -> None:
    """One pull loop per model: a loop whose pull came back empty asks again at once, without
    yielding; it must queue behind the loops already waiting, or a model can wait forever."""
    ledger = InFlight(capacity=1, stage="decode", handbacks=None)
    assert await ledger.reserve(1) == 1  # model a's loop pulls
    waiting = asyncio.create_task(ledger.reserve(1))  # model b's loop waits for the slot
    await asyncio.sleep(0.01)
    ledger.take(1, [])  # a's pull brought nothing: the slot is free again
    asyncio.get_running_loop().call_later(0.05, ledger.take, 1, [])  # b's pull, in its turn, brings nothing
    assert await ledger.reserve(1) == 1  # a asks again at once...
    assert waiting.done() and waiting.result() == 1  # ...and got the slot only after b
