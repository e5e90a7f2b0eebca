"""The Engram lookup protocol on NATS (docs/engram.md says the same for other languages).

A request is a msgpack ``LookupRequest`` on ``df.engram.lookup.<arena name>``. The rows come back as raw
bytes (row-major [n, dim], little-endian, the table's dtype) described by NATS headers, either
in chunks that each fit the server's max_payload ("chunks") or written by the service straight
into a scratch file under the shared scratch directory that the client named ("shm"; same host).
The subject and the arenas' KV bucket are named in ``disagfusion.protocol`` with every other
name on the bus.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from disagfusion.protocol import Message

MAX_IDS_PER_REQUEST = 65536
"""512 KiB of ids: a request always fits NATS's default 1 MiB max_payload."""

# Reply headers.
STATUS = "Df-Status"
"""``ok`` or ``error``."""
ERROR = "Df-Error"
DTYPE = "Df-Dtype"
SHAPE = "Df-Shape"
"""``n,dim``."""
CHUNK = "Df-Chunk"
"""``index/count`` of a chunked reply; its payload starts at row index * rows-per-chunk."""
CHUNK_ROWS = "Df-Chunk-Rows"


class LookupRequest(Message):
    table: str
    ids: bytes
    """Row ids, little-endian int64."""
    reply: Literal["chunks", "shm"] = "chunks"
    shm_path: str | None = None
    """For ``shm``: a file under the service's scratch directory at least n*row_bytes long."""


class ArenaDescriptor(Message):
    """What the service publishes per arena in the ``DF_ENGRAM_ARENAS`` key-value bucket."""

    name: str = Field(pattern=r"^[A-Za-z0-9_=-]{1,128}$")
    location: str
    reader_path: str
    """Where a client on ``host`` maps it read-only (local mode)."""
    host: str
    directory_json: str
    """``ArenaDirectory`` as JSON: tables, dtypes, shapes, checksums, Engram layout."""
    scratch_dir: str
    """Where ``shm`` replies go; a client on ``host`` creates its scratch file here."""
