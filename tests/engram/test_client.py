"""EngramClient in local mode: the rows, the prefetched embeddings and the errors."""

import numpy as np
import pytest
import torch

from disagfusion.engram.arena import Arena, HasherConfig, LookupRequestError, TableSpec
from disagfusion.engram.build import build, engram_specs, random_filler
from disagfusion.engram.client import EngramClient
from disagfusion.engram.hashing import CompressionMap

HASHER = HasherConfig(
    compressed_vocab_size=50, engram_vocab_size=[97, 131, 151], max_ngram_size=4, n_head_per_ngram=2, layer_ids=[0, 2], pad_id=3, seed=11
)


def engram_arena(path: str, dtype: str = "float32") -> None:
    specs, layout = engram_specs(HASHER, dim=6, dtype=dtype)
    specs.append(TableSpec(name="compression", dtype="int64", rows=80, dim=1))
    layout = layout.model_copy(update={"compression_table": "compression"})

    def fill(builder) -> None:  # noqa: ANN001
        random_filler(specs[:-1], seed=3)(builder)
        builder.table("compression")[:, 0] = np.arange(80) % 50

    build(path, specs, fill, layout)


def expected_embeddings(path: str, compressed: np.ndarray) -> dict[int, np.ndarray]:
    """Straight from the definition: hash, add each head's offset, index the layer's table."""
    hasher = HASHER.build()
    with Arena.open(path) as arena:
        out = {}
        for layer, hashes in hasher.hash(compressed).items():
            table = arena.table(f"engram.layer{layer}")
            out[layer] = table[hashes + hasher.head_offsets(layer)].copy()
    return out


def test_lookup_returns_arena_rows_in_the_ids_shape(shm_arena_path: str) -> None:
    engram_arena(shm_arena_path)
    with EngramClient.local(shm_arena_path) as client, Arena.open(shm_arena_path) as arena:
        ids = np.array([[0, 5, 5], [100, 7, 0]])
        rows = client.lookup("engram.layer0", ids)
        assert rows.shape == (2, 3, 6) and rows.dtype == np.float32
        np.testing.assert_array_equal(rows, arena.table("engram.layer0")[ids])
        assert client.lookup("engram.layer0", [4]).shape == (1, 6)


def test_bfloat16_tables_come_back_as_bfloat16(shm_arena_path: str) -> None:
    engram_arena(shm_arena_path, dtype="bfloat16")
    with EngramClient.local(shm_arena_path) as client:
        rows = client.as_tensor("engram.layer2", client.lookup("engram.layer2", [1, 2]))
        assert rows.dtype == torch.bfloat16 and rows.shape == (2, 6)
        assert 0 < rows.float().abs().max() < 1


def test_prefetch_matches_hash_then_gather(shm_arena_path: str) -> None:
    engram_arena(shm_arena_path)
    token_ids = np.random.default_rng(0).integers(0, 80, (3, 9))
    compressed = token_ids % 50
    with EngramClient.local(shm_arena_path) as client:
        handle = client.prefetch(torch.from_numpy(token_ids))
        got = client.wait(handle)
        by_compressed = client.wait(client.prefetch(compressed, compressed=True))
    want = expected_embeddings(shm_arena_path, compressed)
    assert sorted(got) == [0, 2]
    for layer in want:
        assert got[layer].shape == (3, 9, 6, 6)
        np.testing.assert_array_equal(got[layer].numpy(), want[layer])
        np.testing.assert_array_equal(by_compressed[layer].numpy(), want[layer])


def test_a_given_compression_map_wins_over_the_arena_table(shm_arena_path: str) -> None:
    engram_arena(shm_arena_path)
    mapping = CompressionMap(np.zeros(80, dtype=np.int64) + 7, 50)
    with EngramClient.local(shm_arena_path, compression=mapping) as client:
        got = client.wait(client.prefetch(np.arange(6).reshape(1, 6)))
    want = expected_embeddings(shm_arena_path, np.full((1, 6), 7))
    np.testing.assert_array_equal(got[0].numpy(), want[0])


def test_out_of_range_and_unknown_tables_are_refused(shm_arena_path: str) -> None:
    engram_arena(shm_arena_path)
    with EngramClient.local(shm_arena_path) as client:
        rows = client.directory.table("engram.layer0").rows
        with pytest.raises(LookupRequestError, match=f"row id {rows} is out of range"):
            client.lookup("engram.layer0", [0, rows])
        with pytest.raises(LookupRequestError, match="row id -1 is out of range"):
            client.lookup("engram.layer0", [-1])
        many = np.zeros(1000, dtype=np.int64)
        many[500] = -(2**62)
        with pytest.raises(LookupRequestError, match=f"row id {-(2**62)} is out of range"):
            client.lookup("engram.layer0", many)
        many[500] = rows + 3
        with pytest.raises(LookupRequestError, match=f"row id {rows + 3} is out of range"):
            client.lookup("engram.layer0", many)
        with pytest.raises(LookupRequestError, match="no table 'nope'"):
            client.lookup("nope", [0])
        # Every integer dtype is checked: uint32 by numpy's own bound, the rest by the check.
        table = client.rows.table("engram.layer0")
        for dtype in (np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64):
            np.testing.assert_array_equal(client.lookup("engram.layer0", np.array([2, 1], dtype)), table[[2, 1]])
        with pytest.raises(LookupRequestError, match=f"row id {rows} is out of range"):
            client.lookup("engram.layer0", np.array([1, rows], np.uint32))
        with pytest.raises(LookupRequestError, match="row id -2 is out of range"):
            client.lookup("engram.layer0", np.array([1, -2], np.int32))
        with pytest.raises(LookupRequestError, match=f"row id {2**64 - 1} is out of range"):
            client.lookup("engram.layer0", np.array([2**64 - 1], np.uint64))  # -1 once cast to intp
        with pytest.raises(LookupRequestError, match="row ids must be integers, not float64"):
            client.lookup("engram.layer0", [1.5])
        assert client.lookup("engram.layer0", []).shape == (0, 6)
        # A failed prefetch raises in wait(), not silently.
        handle = client.prefetch(np.array([[0, 1, 999]]))
        with pytest.raises(ValueError, match="token id 999 is outside the tokenizer's 80 ids"):
            client.wait(handle)


def test_prefetch_needs_an_engram_layout(shm_arena_path: str) -> None:
    specs = [TableSpec(name="plain", dtype="float32", rows=4, dim=2)]
    build(shm_arena_path, specs, random_filler(specs, 0))
    with EngramClient.local(shm_arena_path) as client:
        with pytest.raises(LookupRequestError, match="no Engram layout"):
            client.prefetch(np.zeros((1, 2)))
