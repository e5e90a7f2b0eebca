from __future__ import annotations

from pathlib import Path

import pytest
import torch

from disagfusion.config import Settings
from disagfusion.models import model_directory


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """The tiny models gain nothing from threads, and on a shared CPU spinning threads slow them down."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory holding the tiny preset, written once per test session."""
    models_dir = tmp_path_factory.mktemp("models")
    model_directory("tiny", Settings(models_dir=models_dir))
    return models_dir


@pytest.fixture(scope="session")
def tiny_dir(tiny_models_dir: Path) -> Path:
    return tiny_models_dir / "tiny"
