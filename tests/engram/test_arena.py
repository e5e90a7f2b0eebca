import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from disagfusion.engram.arena import ALIGN, Arena, ArenaCorruptError, ArenaError, HasherConfig, TableSpec
from disagfusion.engram.build import build, engram_specs, from_source, random_filler, safetensors_filler, safetensors_specs

SPECS = [
    TableSpec(name="a", dtype="float32", rows=1000, dim=16),
    TableSpec(name="b", dtype="float16", rows=3, dim=7),
    TableSpec(name="c", dtype="bfloat16", rows=50, dim=4),
]


def test_random_build_round_trips_and_is_aligned(shm_arena_path: str) -> None:
    owned = build(shm_arena_path, SPECS, random_filler(SPECS, seed=1))
    again = shm_arena_path + ".again"
    try:
        build(again, SPECS, random_filler(SPECS, seed=1))
        with Arena.open(shm_arena_path) as first, Arena.open(again) as second:
            assert os.path.getsize(shm_arena_path) % ALIGN == 0
            for info in first.directory.tables:
                assert info.offset % ALIGN == 0
                assert first.table(info.name).shape == (info.rows, info.dim)
                np.testing.assert_array_equal(first.table(info.name), second.table(info.name))
            assert not first.table("a").flags.writeable
            assert 0.01 < float(np.std(first.table("a"))) < 0.03
        assert owned.directory == first.directory
    finally:
        os.unlink(again)


def test_safetensors_build_keeps_every_value(shm_arena_path: str, tmp_path) -> None:
    tensors = {
        "emb": torch.randn(300, 12),
        "half": torch.randn(5, 3).half(),
        "brain": torch.randn(9, 2).bfloat16(),
        "ids": torch.arange(11, dtype=torch.int64),
    }
    src = tmp_path / "t.safetensors"
    save_file(tensors, src)
    build(shm_arena_path, safetensors_specs(str(src)), safetensors_filler(str(src)))
    with Arena.open(shm_arena_path) as arena:
        for name, tensor in tensors.items():
            got = torch.from_numpy(arena.table(name).copy())
            if tensor.dtype == torch.bfloat16:
                got = got.view(torch.bfloat16)
            assert torch.equal(got.reshape(tensor.shape), tensor)


def test_engram_layout_sizes_tables_by_primes(shm_arena_path: str) -> None:
    config = HasherConfig(
        compressed_vocab_size=500, engram_vocab_size=[100, 200], max_ngram_size=3, n_head_per_ngram=2, layer_ids=[1, 4], pad_id=0, seed=0
    )
    specs, layout = engram_specs(config, dim=8, dtype="float16")
    build(shm_arena_path, specs, random_filler(specs, 0), layout)
    hasher = config.build()
    with Arena.open(shm_arena_path) as arena:
        assert arena.directory.engram == layout
        for layer, table in layout.layer_tables.items():
            assert arena.table(table).shape == (sum(hasher.head_sizes(layer)), 8)


def test_corrupted_table_is_detected_by_name(shm_arena_path: str) -> None:
    build(shm_arena_path, SPECS, random_filler(SPECS, seed=2))
    with Arena.open(shm_arena_path) as arena:
        offset = arena.directory.table("b").offset
    with open(shm_arena_path, "r+b") as f:
        f.seek(offset + 5)
        byte = f.read(1)
        f.seek(offset + 5)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ArenaCorruptError, match="table 'b'.*corrupted"):
        Arena.open(shm_arena_path)
    Arena.open(shm_arena_path, verify=False).close()


def test_corrupted_directory_and_foreign_files_are_rejected(shm_arena_path: str) -> None:
    build(shm_arena_path, SPECS, random_filler(SPECS, seed=3))
    with open(shm_arena_path, "r+b") as f:
        f.seek(40)
        f.write(b"#")
    with pytest.raises(ArenaCorruptError, match="directory"):
        Arena.open(shm_arena_path)
    with open(shm_arena_path, "r+b") as f:
        f.write(b"NOTANARENA")
    with pytest.raises(ArenaError, match="not an Engram arena"):
        Arena.open(shm_arena_path)


def test_truncated_arena_is_rejected(shm_arena_path: str) -> None:
    build(shm_arena_path, SPECS, random_filler(SPECS, seed=3))
    os.truncate(shm_arena_path, ALIGN + 4096)
    with pytest.raises(ArenaCorruptError, match="truncated"):
        Arena.open(shm_arena_path)


def test_duplicate_table_names_are_rejected(shm_arena_path: str) -> None:
    with pytest.raises(ArenaError, match="unique"):
        build(shm_arena_path, SPECS + SPECS[:1], random_filler(SPECS, 0))
    assert not os.path.exists(shm_arena_path)


def test_numa_arena_copies_a_file_arena_and_is_readable_through_published_path(shm_arena_path: str) -> None:
    build(shm_arena_path, SPECS, random_filler(SPECS, seed=4))
    specs, fill, engram = from_source(shm_arena_path)
    owned = build("numa:0:df-engram-test", specs, fill, engram)
    try:
        assert owned.reader_path.startswith(f"/proc/{os.getpid()}/fd/")
        with Arena.open(owned.reader_path) as copy, Arena.open(shm_arena_path) as original:
            for info in original.directory.tables:
                np.testing.assert_array_equal(copy.table(info.name), original.table(info.name))
    finally:
        os.close(owned.numa_fd)


READER = textwrap.dedent(
    """
    import re, sys
    from disagfusion.engram.arena import Arena
    arena = Arena.open(sys.argv[1], verify=False)
    total = float(arena.table("big").sum(dtype="float64"))  # touch every page
    print("ready", flush=True)
    sys.stdin.readline()
    rss = pss = 0
    inside = False
    for line in open("/proc/self/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header line
            inside = line.rstrip().endswith(sys.argv[1])
            continue
        if inside and line.startswith("Rss:"):
            rss += int(line.split()[1])
        if inside and line.startswith("Pss:"):
            pss += int(line.split()[1])
    print(rss, pss, total, flush=True)
    """
)


def test_two_readers_share_one_physical_copy(shm_arena_path: str) -> None:
    rows = 64 * 1024 * 1024 // (64 * 4)
    specs = [TableSpec(name="big", dtype="float32", rows=rows, dim=64)]
    build(shm_arena_path, specs, random_filler(specs, seed=5))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, shm_arena_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    try:
        for reader in readers:
            assert reader.stdout.readline().strip() == "ready"
        results = []
        for reader in readers:
            reader.stdin.write("\n")
            reader.stdin.flush()
            rss_kb, pss_kb, total = reader.stdout.readline().split()
            results.append((int(rss_kb), int(pss_kb), float(total)))
    finally:
        for reader in readers:
            reader.kill()
            reader.wait()
    table_kb = rows * 64 * 4 // 1024
    for rss_kb, pss_kb, _ in results:
        # Each reader sees the whole table resident, but owns only half of it: one copy, two mappers.
        assert rss_kb >= 0.95 * table_kb
        assert abs(pss_kb - rss_kb / 2) <= 0.05 * rss_kb
    assert results[0][2] == results[1][2]


def test_locations_parse_by_kind() -> None:
    from disagfusion.engram.arena import DEFAULT_DIR, Location

    assert Location.parse("/dev/dax0.1") == Location(kind="devdax", path="/dev/dax0.1")
    assert Location.parse("numa:2:big") == Location(kind="numa", path="big", numa_node=2)
    assert Location.parse("/mnt/famfs/e.arena") == Location(kind="file", path="/mnt/famfs/e.arena")
    assert Location.parse("demo") == Location(kind="file", path=str(DEFAULT_DIR / "demo.arena"))


def test_a_bare_name_builds_in_the_default_directory() -> None:
    import uuid

    from disagfusion.engram.arena import DEFAULT_DIR

    name = f"df-engram-test-{uuid.uuid4().hex}"
    owned = build(name, SPECS, random_filler(SPECS, seed=6))
    try:
        assert owned.reader_path == str(DEFAULT_DIR / f"{name}.arena")
        with Arena.open(name) as arena:
            assert arena.table("a").shape == (1000, 16)
    finally:
        os.unlink(owned.reader_path)
