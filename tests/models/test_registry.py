"""The name registries in disagfusion.models agree with the family modules they point to."""

from __future__ import annotations

import importlib

from disagfusion.models import FAMILIES, PRESET_WRITERS
from disagfusion.models import emulated, presets


def test_every_preset_is_registered_once() -> None:
    defined = {**dict.fromkeys(presets.PRESETS, presets.__name__), **dict.fromkeys(emulated.PRESETS, emulated.__name__)}
    assert PRESET_WRITERS == defined


def test_every_family_module_has_the_family_interface() -> None:
    for module_name in FAMILIES.values():
        module = importlib.import_module(module_name)
        assert set(module.STAGE_MODELS) == {"encode", "denoise", "decode"}
        assert callable(module.check_spec)
