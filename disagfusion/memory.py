"""Device memory each stage of a model needs, for placement: the bytes of its weights plus
working memory (activations, attention buffers, decoded frames). A stage is only placed on a
device class with at least that much memory (``services/scheduler/pool.py``).

Weights come from the model's files where its directory is in the models dir (the family
reads them: ``disagfusion.models.weight_bytes``), else from its cost profile's
``weight_bytes`` (so a fleet can be planned before the checkpoint is downloaded). Working
memory comes from the profile's ``activation_bytes`` where it gives them, else an allowance in
proportion to the weights: activations grow with the job's size, which placement does not know,
so the allowance is a margin, not a measurement."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict

from disagfusion.config import Settings
from disagfusion.cost import CostProfile
from disagfusion.protocol import STAGES

GB = 1e9
"""Memory sizes are in decimal gigabytes, as GPU data sheets give them (an H100's 80 GB)."""

ACTIVATION_ALLOWANCE = 0.2
"""Working memory, as a fraction of a stage's weights, where its profile gives no figure."""


class StageMemory(BaseModel):
    """What one stage of one model needs on its device."""

    model_config = ConfigDict(frozen=True)

    model: str
    weight_bytes: int
    activation_bytes: int
    source: Literal["files", "profile", "unknown"]
    """Where the weight bytes come from: the model's files, its cost profile, or nowhere (0:
    the stage fits anywhere, as before memory was known)."""

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    def describe(self) -> str:
        return (f"{self.total_bytes / GB:.1f} GB (weights {self.weight_bytes / GB:.1f} GB + working "
                f"{self.activation_bytes / GB:.1f} GB, from {self.source})")


def _files_weight_bytes(name: str, settings: Settings) -> dict[str, int] | None:
    """Weight bytes from the model's directory, if it is there; never writes a preset (that
    would build and save a model just to plan)."""
    if not (settings.models_dir / name / "model_index.json").is_file():
        return None
    from disagfusion.models import weight_bytes  # the registry imports families lazily; so do we

    found = weight_bytes(name, settings)
    return found if any(found.values()) else None


def model_memory(name: str, settings: Settings, profile: CostProfile | None = None,
                 allowance: float = ACTIVATION_ALLOWANCE) -> dict[str, StageMemory]:
    """Per stage, the memory model ``name`` needs: see the module docstring for the sources."""
    files = _files_weight_bytes(name, settings)
    declared = profile.weight_bytes if profile is not None else {}
    memory = {}
    for stage in STAGES:
        if files is not None:
            weights, source = files.get(stage, 0), "files"
        elif stage in declared:
            weights, source = declared[stage], "profile"
        else:
            weights, source = 0, "unknown"
        given = profile.activation_bytes if profile is not None else {}
        working = given[stage] if stage in given else round(weights * allowance)
        memory[stage] = StageMemory(model=name, weight_bytes=weights, activation_bytes=working, source=source)
    return memory


def stage_needs(models: Iterable[Mapping[str, StageMemory]]) -> dict[str, StageMemory]:
    """Per stage, the largest need among the models served: an instance of a stage may be
    handed any model's job, so it must fit the largest."""
    needs: dict[str, StageMemory] = {}
    for memory in models:
        for stage, need in memory.items():
            if stage not in needs or need.total_bytes > needs[stage].total_bytes:
                needs[stage] = need
    return needs


def fleet_memory(models: Iterable[str], profiles: Iterable[CostProfile], settings: Settings,
                 allowance: float = ACTIVATION_ALLOWANCE) -> dict[str, StageMemory]:
    """``stage_needs`` of the models served, each with its cost profile where there is one."""
    by_model = {profile.model: profile for profile in profiles}
    return stage_needs(model_memory(name, settings, by_model.get(name), allowance) for name in models)
