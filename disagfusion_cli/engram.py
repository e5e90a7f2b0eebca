"""``disagfusion engram build | info | lookup``: create an arena, show its tables, read rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import typer
from rich.table import Table

from disagfusion.engram.arena import Arena, ArenaError, LookupRequestError, TableSpec
from disagfusion.engram.build import build, from_source, from_spec, random_filler
from disagfusion.engram.client import EngramClient, EngramServiceError
from disagfusion.engram.spec import EngramArenaSpec
from disagfusion_cli.common import console, fail

app = typer.Typer(help="Engram arenas: build one, show its tables, look rows up.", no_args_is_help=True)

_TABLE = re.compile(r"^([A-Za-z0-9_.-]+):(\d+)x(\d+)(?::(float32|float16|bfloat16))?$")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@app.command("build")
def build_command(
    location: str = typer.Argument(help="file path (tmpfs, hugetlbfs, fsdax, famfs), /dev/daxX.Y"),
    source: str = typer.Option(None, "--from", help="a .safetensors file or another arena to copy"),
    table: list[str] = typer.Option([], help="random table NAME:ROWSxDIM[:DTYPE]; repeatable"),  # noqa: B008
    engram_vocab: str = typer.Option(None, help="Engram tables: rows per head for each order, e.g. 646400,646400"),
    max_ngram: int = typer.Option(3, help="Engram: largest n-gram order"),
    heads: int = typer.Option(8, help="Engram: hash heads per order"),
    layers: str = typer.Option("1", help="Engram: layer ids, e.g. 1,15"),
    dim: int = typer.Option(64, help="Engram: values per head row"),
    dtype: str = typer.Option("float32", help="Engram / random tables: float32, float16 or bfloat16"),
    compressed_vocab: int = typer.Option(None, help="Engram: compressed vocabulary size (or use --tokenizer)"),
    tokenizer: str = typer.Option(None, help="Engram: tokenizer directory (or byt5); stores its compression map"),
    pad_id: int = typer.Option(0, help="Engram: pad token id (a tokenizer id when --tokenizer is given)"),
    seed: int = typer.Option(0, help="hash seed and random-init seed"),
) -> None:
    """Create an arena from a file, from random tables, or sized for an Engram config."""
    try:
        if source:
            specs, fill, layout = from_source(source)
        elif engram_vocab:
            specs, fill, layout = from_spec(
                EngramArenaSpec(
                    engram_vocab=_ints(engram_vocab), max_ngram=max_ngram, heads=heads, layers=_ints(layers), dim=dim,
                    dtype=dtype, tokenizer=tokenizer, compressed_vocab=compressed_vocab, pad_id=pad_id, seed=seed,
                )
            )
        elif table:
            specs = [_table_spec(t) for t in table]
            fill, layout = random_filler(specs, seed), None
        else:
            raise typer.BadParameter("give --from, --table or --engram-vocab")
        owned = build(location, specs, fill, layout)
    except (ArenaError, ValueError) as exc:
        fail(str(exc))
    console.print(f"built {owned.location}: {len(owned.directory.tables)} tables, {owned.directory.total_bytes / 2**20:.1f} MiB")


def _table_spec(text: str) -> TableSpec:
    m = _TABLE.match(text)
    if m is None:
        raise typer.BadParameter(f"--table {text!r}: expected NAME:ROWSxDIM[:DTYPE]")
    return TableSpec(name=m.group(1), rows=int(m.group(2)), dim=int(m.group(3)), dtype=m.group(4) or "float32")


@app.command("info")
def info_command(
    location: str = typer.Argument(help="arena path or /dev/daxX.Y"),
    verify: bool = typer.Option(True, help="check every table's checksum"),
    as_json: bool = typer.Option(False, "--json", help="print the table directory as JSON"),
) -> None:
    """Show an arena's tables (and Engram layout); exit 1 if it is corrupted."""
    try:
        with Arena.open(location, verify=verify, populate=False) as arena:
            directory = arena.directory
    except (ArenaError, OSError) as exc:
        fail(str(exc))
    if as_json:
        print(directory.model_dump_json())
        return
    out = Table(title=f"{location} ({Path(location).stat().st_size / 2**20:.1f} MiB, checksums {'verified' if verify else 'not checked'})")
    for column in ("table", "dtype", "rows", "dim", "MiB", "offset", "xxh3"):
        out.add_column(column)
    for t in directory.tables:
        out.add_row(t.name, t.dtype, str(t.rows), str(t.dim), f"{t.nbytes / 2**20:.1f}", str(t.offset), t.checksum)
    console.print(out)
    if directory.engram:
        console.print("Engram layout:", directory.engram.model_dump_json())


@app.command("lookup")
def lookup_command(
    table: str = typer.Argument(help="table name"),
    ids: list[int] = typer.Argument(help="row ids"),  # noqa: B008
    arena: str = typer.Option(None, help="map this arena locally"),
    nats_url: str = typer.Option(None, "--nats", help="ask engram_store at this NATS URL instead"),
    name: str = typer.Option(None, help="with --nats: the published arena's name"),
) -> None:
    """Print rows of a table as JSON, one row per line."""
    if (arena is None) == (nats_url is None):
        raise typer.BadParameter("give exactly one of --arena or --nats")
    try:
        client = EngramClient.local(arena, verify=False) if arena else EngramClient.remote(nats_url, arena=name)
        with client:
            rows = client.lookup(table, np.asarray(ids, dtype=np.int64))
            as_float = client.as_tensor(table, rows).float().numpy()
    except (ArenaError, LookupRequestError, EngramServiceError, OSError) as exc:
        fail(str(exc))
    for row_id, row in zip(ids, as_float.tolist(), strict=True):
        print(json.dumps({"id": row_id, "row": row}))
