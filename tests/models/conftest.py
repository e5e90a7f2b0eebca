from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """The tiny models gain nothing from threads, and on a shared CPU spinning threads slow them down."""
    torch.set_num_threads(1)
