from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest

from disagfusion.config import Settings
from disagfusion.models import load_stage_model
from disagfusion.models.base import StageModel
from disagfusion.protocol import STAGES


@pytest.fixture(scope="module")
def stages(tiny_models_dir: Path) -> Callable[..., dict[str, StageModel]]:
    """``stages(model, dtype)``: the three stages of ``model``, each loaded once per test module."""

    @cache
    def load(model: str, dtype: str = "float32") -> dict[str, StageModel]:
        settings = Settings(models_dir=tiny_models_dir, dtype=dtype)
        return {stage: load_stage_model(model, stage, settings) for stage in STAGES}

    return load
