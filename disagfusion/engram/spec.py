"""What an Engram arena built from scratch holds (hashing config, row shape, tokenizer), as
one settings value: ``disagfusion engram build --engram-vocab ...`` and engram_store (for an
arena in DF_ENGRAM_ARENAS that does not exist yet, from DF_ENGRAM_SPEC) build the same thing.

Only pydantic here: Settings imports it, and workers that never touch Engram should not pay
for numpy or tokenizers on import.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RowDType = Literal["float32", "float16", "bfloat16", "int64"]

BYT5 = "byt5"
"""The byte-level tokenizer of the tiny and small presets (built in: it needs no files)."""


class EngramArenaSpec(BaseModel):
    """The defaults fit the presets: ByT5's 256 byte tokens compress to ~200 ids, and layer 0
    feeds the first text-encoder block, which every preset has. About 5 MiB of rows."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    engram_vocab: list[int] = Field(default=[5000, 5000], min_length=1)
    """Rows per head for each n-gram order 2..max_ngram (rounded up to distinct primes)."""
    max_ngram: int = Field(default=3, ge=2)
    heads: int = Field(default=4, ge=1)
    """Hash heads per order."""
    layers: list[int] = Field(default=[0], min_length=1)
    """Engram layer ids; with DF_ENGRAM_BLOCKS unset, layer i feeds text-encoder block i."""
    dim: int = Field(default=32, ge=1)
    """Values per head row."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    tokenizer: str | None = BYT5
    """``byt5``, or a tokenizer directory (a checkpoint's ``<model>/tokenizer``): its compression
    map is stored in the arena. None: hash compressed ids of ``compressed_vocab`` directly."""
    compressed_vocab: int | None = Field(default=None, gt=0)
    pad_id: int = 0
    """The pad token: a tokenizer id when there is a tokenizer, else a compressed id."""
    seed: int = 0
    """Hash seed, and the seed of the random rows."""
    scale: float = Field(default=0.02, gt=0)
    """Standard deviation of the random rows."""
