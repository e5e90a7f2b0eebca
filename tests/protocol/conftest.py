"""A running stack for the wire-level contract tests, handed to them as a NATS URL only: the
tests speak msgpack over NATS as a client in another language would."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from disagfusion.launcher import Launcher
from tests.integration.conftest import running_stack


@pytest.fixture(scope="module")
def contract_stack(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Launcher]:
    """A stack serving the tiny model (one process per stage), with tenant ``acme``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DF_MODELS", "tiny")
        with running_stack(tmp_path_factory.mktemp("contract"), tiny_models_dir, tenants=("acme",)) as launcher:
            yield launcher


@pytest.fixture(scope="module")
def nats_of_stack(contract_stack: Launcher) -> str:
    """The stack's NATS URL, with the admin's credentials."""
    return contract_stack.client_settings().nats_url


@pytest.fixture(scope="module")
def acme_of_stack(contract_stack: Launcher) -> str:
    """The stack's NATS URL, with tenant ``acme``'s credentials."""
    return contract_stack.client_settings("acme").nats_url
