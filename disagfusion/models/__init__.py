"""Model families, and finding a model by name: ``settings.models_dir / <name>`` is a diffusers
directory whose ``model_index.json`` ``_class_name`` picks the family. Preset names
(``PRESET_WRITERS``: tiny and small PixArt-Sigma, a tiny model of each other family, and the
emulated accelerators) are written there on first use, so services work offline out of the box. A model directory may carry its cost profile
(``PROFILE_FILE``; emulated models do, as their stages sleep for what it says)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from disagfusion.config import ModelSettings, Settings
from disagfusion.cost import CostProfile
from disagfusion.models.base import SpecError, StageModel
from disagfusion.models.family import Family
from disagfusion.protocol import STAGES, JobSpec

# Families are imported on first use: an emulated worker then never pays for importing
# diffusers and transformers. Each family module defines FAMILY (a ``family.Family``); a module
# that writes presets also has init_model(preset, directory).
FAMILIES: dict[str, str] = {
    "PixArtSigmaPipeline": "disagfusion.models.pixart",
    "StableDiffusion3Pipeline": "disagfusion.models.sd3",
    "FluxPipeline": "disagfusion.models.flux",
    "SanaPipeline": "disagfusion.models.sana",
    "QwenImagePipeline": "disagfusion.models.qwen_image",
    "CogVideoXPipeline": "disagfusion.models.cogvideox",
    "HunyuanVideoPipeline": "disagfusion.models.hunyuan_video",
    "WanPipeline": "disagfusion.models.wan",
    "LTXPipeline": "disagfusion.models.ltx",
    "DisagFusionEmulated": "disagfusion.models.emulated",
}
"""Pipeline class name (``model_index.json`` ``_class_name``) -> the module of its family."""

PROFILE_FILE = "profile.yaml"
"""A model directory's own cost profile (``disagfusion.cost.CostProfile``), if it has one."""

PRESET_WRITERS: dict[str, str] = {
    "tiny": "disagfusion.models.presets",
    "small": "disagfusion.models.presets",
    "sd3-tiny": "disagfusion.models.sd3",
    "flux-tiny": "disagfusion.models.flux",
    "sana-tiny": "disagfusion.models.sana",
    "qwen-image-tiny": "disagfusion.models.qwen_image",
    "cogvideox-tiny": "disagfusion.models.cogvideox",
    "hunyuan-video-tiny": "disagfusion.models.hunyuan_video",
    "wan-tiny": "disagfusion.models.wan",
    "ltx-tiny": "disagfusion.models.ltx",
    "emulated": "disagfusion.models.emulated",
    "emulated-video": "disagfusion.models.emulated",
}
"""Preset name -> the module whose ``init_model(name, directory)`` writes it."""


def init_preset(name: str, directory: Path) -> Path:
    """Write preset ``name`` to ``directory`` (unless something is there) and return it."""
    if name not in PRESET_WRITERS:
        raise KeyError(f"unknown preset {name!r}; presets are {', '.join(PRESET_WRITERS)}")
    return importlib.import_module(PRESET_WRITERS[name]).init_model(name, directory)


def model_directory(name: str, settings: Settings) -> Path:
    """The directory of model ``name``, writing it first if it is a preset not yet there."""
    directory = settings.models_dir / name
    if not directory.exists() and name in PRESET_WRITERS:
        init_preset(name, directory)
    if not (directory / "model_index.json").is_file():
        raise SpecError(
            "model",
            f"unknown model {name!r}: no diffusers model directory (with model_index.json) at {directory}; "
            f"use a preset ({', '.join(PRESET_WRITERS)}) or place a PixArt-Sigma checkpoint directory there "
            f"(DF_MODELS_DIR={settings.models_dir})",
        )
    return directory


def model_family(directory: Path) -> Family:
    """The family of the model in ``directory``, by its pipeline class."""
    class_name = json.loads((directory / "model_index.json").read_text()).get("_class_name")
    if class_name not in FAMILIES:
        raise SpecError(
            "model",
            f"model at {directory} is a {class_name!r}, which DisagFusion cannot split into stages "
            f"(supported: {', '.join(FAMILIES)})",
        )
    return importlib.import_module(FAMILIES[class_name]).FAMILY


def load_stage_model(name: str, stage: str, settings: Settings) -> StageModel:
    """Load the weights of ``stage`` ("encode", "denoise" or "decode") of model ``name``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    directory = model_directory(name, settings)
    return model_family(directory).load_stage(directory, stage, settings)


def check_spec(spec: JobSpec, settings: Settings) -> None:
    """Raise SpecError if ``spec.model`` cannot run ``spec``; reads configs only, no weights."""
    directory = model_directory(spec.model, settings)
    model_family(directory).check_spec(directory, spec)


def weight_bytes(name: str, settings: Settings) -> dict[str, int]:
    """Bytes of weights each stage of model ``name`` loads, from its files (for placement)."""
    directory = model_directory(name, settings)
    return model_family(directory).weight_bytes(directory, settings.variant or None)


def carried_profile(name: str, settings: ModelSettings) -> CostProfile | None:
    """The cost profile model ``name`` carries in its directory, as a profile of ``name`` (an
    emulated preset's is the one in the profiles dir it is written with, if not written yet);
    None for a model that carries none. Reads files only: no preset is written, no weights loaded."""
    path = settings.models_dir / name / PROFILE_FILE
    if path.is_file():
        profile = CostProfile.load(path)
    else:
        # Imported here, as families are: only an emulated preset has a profile before it is written.
        from disagfusion.models.emulated import PRESETS

        if name not in PRESETS:
            return None
        profile = CostProfile.named(PRESETS[name].profile, settings.profiles_dir)
    return profile.model_copy(update={"model": name})
