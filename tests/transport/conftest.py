"""Helpers for the shm transport tests: make a slot look old without waiting."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from disagfusion.protocol import TensorRef
from disagfusion.transport.shm import PeerSlot, parse_key


@pytest.fixture
def age_slot() -> Callable[[Path, TensorRef, float], None]:
    """Backdate the claim time in a ref's slot header by ``seconds``, as the janitor reads it."""

    def age(directory: Path, ref: TensorRef, seconds: float) -> None:
        slot = PeerSlot(directory / parse_key(ref.key)[0])
        slot.stamp(time.time() - seconds)
        slot.close()

    return age
