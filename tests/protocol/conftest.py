"""A running stack for the wire-level contract tests, handed to them as a NATS URL only: the
tests speak msgpack over NATS as a client in another language would."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import running_stack


@pytest.fixture(scope="module")
def nats_of_stack(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[str]:
    """The NATS URL of a stack serving the tiny model (one process per stage)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DF_MODELS", "tiny")
        with running_stack(tmp_path_factory.mktemp("contract"), tiny_models_dir) as launcher:
            yield launcher.client_settings().nats_url
