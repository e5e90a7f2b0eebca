import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from disagfusion.engram.arena import Arena
from disagfusion_cli.engram import app as engram_app

runner = CliRunner()
TOKENIZER = Path(__file__).parent / "golden" / "tokenizer"


def test_build_info_lookup_random_tables(shm_arena_path: str) -> None:
    result = runner.invoke(engram_app, ["build", shm_arena_path, "--table", "emb:1000x8", "--table", "small:10x3:float16"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(engram_app, ["info", shm_arena_path, "--json"])
    assert result.exit_code == 0, result.output
    directory = json.loads(result.output)
    assert [(t["name"], t["rows"], t["dim"], t["dtype"]) for t in directory["tables"]] == [
        ("emb", 1000, 8, "float32"),
        ("small", 10, 3, "float16"),
    ]
    result = runner.invoke(engram_app, ["lookup", "emb", "3", "999", "--arena", shm_arena_path])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    with Arena.open(shm_arena_path) as arena:
        assert [line["id"] for line in lines] == [3, 999]
        np.testing.assert_allclose([line["row"] for line in lines], arena.table("emb")[[3, 999]], rtol=1e-6)


def test_lookup_out_of_range_fails_clearly(shm_arena_path: str) -> None:
    runner.invoke(engram_app, ["build", shm_arena_path, "--table", "emb:10x2"])
    result = runner.invoke(engram_app, ["lookup", "emb", "10", "--arena", shm_arena_path])
    assert result.exit_code == 1
    assert "row id 10 is out of range" in result.output


def test_engram_build_with_tokenizer_stores_its_compression_map(shm_arena_path: str) -> None:
    result = runner.invoke(
        engram_app,
        ["build", shm_arena_path, "--engram-vocab", "101,103", "--heads", "2", "--layers", "1,3", "--dim", "4", "--tokenizer", str(TOKENIZER)],
    )
    assert result.exit_code == 0, result.output
    with Arena.open(shm_arena_path) as arena:
        layout = arena.directory.engram
        assert layout is not None and layout.compression_table == "compression"
        assert sorted(layout.layer_tables) == [1, 3]
        golden = json.loads((Path(__file__).parent / "golden" / "tokenizer_compressed.json").read_text())
        assert arena.table("compression")[:, 0].tolist() == golden["compression_lookup"]
        assert layout.hasher.compressed_vocab_size == golden["compressed_vocab_size"]


def test_info_reports_corruption(shm_arena_path: str) -> None:
    runner.invoke(engram_app, ["build", shm_arena_path, "--table", "emb:1000x8"])
    with Arena.open(shm_arena_path) as arena:
        offset = arena.directory.table("emb").offset
    with open(shm_arena_path, "r+b") as f:
        f.seek(offset + 100)
        f.write(b"\xff\xff")
    result = runner.invoke(engram_app, ["info", shm_arena_path])
    assert result.exit_code == 1
    assert "corrupted" in result.output
