"""Model families, and finding a model by name: ``settings.models_dir / <name>`` is a diffusers
directory whose ``model_index.json`` ``_class_name`` picks the family. Preset names (tiny,
small) are written there on first use, so services work offline out of the box.

Family modules (and diffusers with them) are imported on first use: importing this package,
say for ``SpecError``, stays cheap for processes that never load a model.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol, cast

from disagfusion.config import Settings
from disagfusion.models.base import SpecError, StageModel
from disagfusion.protocol import JobSpec

PRESET_NAMES = ("tiny", "small")
"""The built-in models of ``disagfusion.models.presets``, named here to spare importing it."""


class ModelFamily(Protocol):
    """What a family module defines."""

    STAGE_MODELS: Mapping[str, Callable[[Path, Settings], StageModel]]
    """Stage name -> constructor taking (model directory, settings); it loads the weights."""

    def check_spec(self, directory: Path, spec: JobSpec) -> None:
        """Validate a spec from the directory's configs alone, without loading weights."""


FAMILIES: dict[str, str] = {
    "PixArtSigmaPipeline": "disagfusion.models.pixart",
}
"""Pipeline class name (``model_index.json`` ``_class_name``) -> family module."""


def model_directory(name: str, settings: Settings) -> Path:
    """The directory of model ``name``, writing it first if it is a preset not yet there."""
    directory = settings.models_dir / name
    if not directory.exists() and name in PRESET_NAMES:
        from disagfusion.models.presets import init_model

        init_model(name, directory)
    if not (directory / "model_index.json").is_file():
        raise SpecError(
            "model",
            f"unknown model {name!r}: no diffusers model directory (with model_index.json) at {directory}; "
            f"use a preset ({', '.join(PRESET_NAMES)}) or place a PixArt-Sigma checkpoint directory there "
            f"(DF_MODELS_DIR={settings.models_dir})",
        )
    return directory


def model_family(directory: Path) -> ModelFamily:
    class_name = json.loads((directory / "model_index.json").read_text()).get("_class_name")
    if class_name not in FAMILIES:
        raise SpecError(
            "model",
            f"model at {directory} is a {class_name!r}, which DisagFusion cannot split into stages "
            f"(supported: {', '.join(FAMILIES)})",
        )
    return cast(ModelFamily, importlib.import_module(FAMILIES[class_name]))


def load_stage_model(name: str, stage: str, settings: Settings) -> StageModel:
    """Load the weights of ``stage`` ("encode", "denoise" or "decode") of model ``name``."""
    directory = model_directory(name, settings)
    family = model_family(directory)
    if stage not in family.STAGE_MODELS:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(family.STAGE_MODELS)}")
    return family.STAGE_MODELS[stage](directory, settings)


def check_spec(spec: JobSpec, settings: Settings) -> None:
    """Raise SpecError if ``spec.model`` cannot run ``spec``; reads configs only, no weights."""
    directory = model_directory(spec.model, settings)
    model_family(directory).check_spec(directory, spec)
