"""The engram store's settings (``DF_ENGRAM_*``), besides the bus every service shares."""

from __future__ import annotations

from pathlib import Path

from disagfusion.config import BusSettings, MetricsSettings
from disagfusion.engram.spec import EngramArenaSpec


class EngramStoreSettings(BusSettings, MetricsSettings):
    engram_arenas: str = ""
    """Comma-separated arenas engram_store serves: a location (a file on tmpfs/hugetlbfs/fsdax/
    famfs, /dev/daxX.Y) holding a built arena, or ``LOCATION<=SOURCE`` to build LOCATION (also
    ``numa:<node>:<name>``) at start from SOURCE (an arena file or a .safetensors file). A
    location that holds no arena yet (a missing file, or ``numa:`` without a source) is built
    from DF_ENGRAM_SPEC: ``DF_ENGRAM_ARENAS=default`` serves the presets out of the box."""
    engram_spec: EngramArenaSpec = EngramArenaSpec()
    """JSON (``{"engram_vocab": [20000, 20000], "tokenizer": "/models/x/tokenizer"}``): the
    arena engram_store builds for a location that holds none. The defaults fit the presets."""
    engram_scratch_dir: Path = Path("/dev/shm/disagfusion-engram/scratch")
    """Where same-host clients put the files engram_store writes "shm" lookup replies into
    (published to them in each arena's descriptor)."""
