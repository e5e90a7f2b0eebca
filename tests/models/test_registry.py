"""The name registries in disagfusion.models agree with the family modules they point to."""

from __future__ import annotations

import importlib

from disagfusion.models import FAMILIES, PRESET_WRITERS
from disagfusion.models.family import DiffusersFamily, Family
from disagfusion.protocol import STAGES


def test_every_preset_is_registered_once() -> None:
    # Every module that defines presets (family modules included) is registered for each of
    # them, and for no other.
    modules = {"disagfusion.models.presets", *FAMILIES.values(), *PRESET_WRITERS.values()}
    writers = {module for module in modules if hasattr(importlib.import_module(module), "PRESETS")}
    defined = [(name, module) for module in sorted(writers) for name in importlib.import_module(module).PRESETS]
    assert len(defined) == len(dict(defined)), "a preset name defined by two modules"
    assert PRESET_WRITERS == dict(defined)


def test_every_family_module_defines_its_family() -> None:
    for class_name, module_name in FAMILIES.items():
        family = importlib.import_module(module_name).FAMILY
        assert isinstance(family, Family) and family.pipeline_class == class_name
        if isinstance(family, DiffusersFamily):
            assert set(family.stage_components) == set(family.handoff) == set(STAGES)
            loaded = [name for stage in STAGES for name in family.stage_components[stage]]
            assert len(loaded) == len(set(loaded)), "a component loaded by two stages"
