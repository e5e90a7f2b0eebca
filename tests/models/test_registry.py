"""The name registries in disagfusion.models agree with the family modules they point to."""

from __future__ import annotations

import importlib

from disagfusion.models import FAMILIES, PRESET_WRITERS
from disagfusion.models import emulated, presets
from disagfusion.models.family import DiffusersFamily, Family
from disagfusion.protocol import STAGES


def test_every_preset_is_registered_once() -> None:
    defined = {**dict.fromkeys(presets.PRESETS, presets.__name__), **dict.fromkeys(emulated.PRESETS, emulated.__name__)}
    assert PRESET_WRITERS == defined


def test_every_family_module_defines_its_family() -> None:
    for class_name, module_name in FAMILIES.items():
        family = importlib.import_module(module_name).FAMILY
        assert isinstance(family, Family) and family.pipeline_class == class_name
        if isinstance(family, DiffusersFamily):
            assert set(family.stage_components) == set(family.handoff) == set(STAGES)
            loaded = [name for stage in STAGES for name in family.stage_components[stage]]
            assert len(loaded) == len(set(loaded)), "a component loaded by two stages"
