"""Riding out a JetStream leader election in tests that kill a NATS cluster node. A plain module
beside conftest.py (whose directory pytest puts on the import path), not a fixture."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from disagfusion.bus import JETSTREAM_UNAVAILABLE, JETSTREAM_WAIT_S

T = TypeVar("T")


async def through_elections(request: Callable[[], Awaitable[T]], timeout: float = JETSTREAM_WAIT_S) -> T:
    """`request()` (a JetStream API call), retried while a stream has no leader: right after a
    NATS node is killed the survivors take several seconds to elect one, and until then the API
    answers nothing (a timeout) or "no responders"."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await request()
        except JETSTREAM_UNAVAILABLE:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(1)
