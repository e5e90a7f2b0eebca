import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from disagfusion.engram.hashing import CompressionMap, NgramHasher, is_prime

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.json"))


def load(name: str) -> dict:
    return json.loads((GOLDEN / f"{name}.json").read_text())


def hasher_for(case: dict) -> NgramHasher:
    return NgramHasher(
        compressed_vocab_size=case["compressed_vocab_size"],
        engram_vocab_size=case["engram_vocab_size"],
        max_ngram_size=case["max_ngram_size"],
        n_head_per_ngram=case["n_head_per_ngram"],
        layer_ids=case["layer_ids"],
        pad_id=case["pad_id"],
        seed=case["seed"],
    )


def test_golden_set_covers_required_configs() -> None:
    assert "reference_defaults" in CASES
    assert any(load(c)["max_ngram_size"] == 4 for c in CASES)


@pytest.mark.parametrize("name", CASES)
def test_multipliers_and_primes_match_reference(name: str) -> None:
    case = load(name)
    hasher = hasher_for(case)
    for layer in case["layer_ids"]:
        assert hasher.multipliers[layer].dtype == np.int64
        assert hasher.multipliers[layer].tolist() == case["multipliers"][str(layer)]
        assert hasher.primes[layer] == case["primes"][str(layer)]


@pytest.mark.parametrize("name", CASES)
def test_hashes_match_reference(name: str) -> None:
    case = load(name)
    ids = np.asarray(case.get("compressed_input_ids", case["input_ids"]), dtype=np.int64)
    hashes = hasher_for(case).hash(ids)
    assert sorted(hashes) == sorted(case["layer_ids"])
    for layer in case["layer_ids"]:
        expected = np.asarray(case["hashes"][str(layer)], dtype=np.int64)
        assert hashes[layer].dtype == np.int64
        np.testing.assert_array_equal(hashes[layer], expected)


def test_compression_map_matches_reference() -> None:
    case = load("tokenizer_compressed")
    tokenizer = AutoTokenizer.from_pretrained(GOLDEN / "tokenizer")
    compression = CompressionMap.from_tokenizer(tokenizer)
    assert compression.lookup.tolist() == case["compression_lookup"]
    assert compression.compressed_vocab_size == case["compressed_vocab_size"]
    # The test tokenizer has case and accent variants, so compression must merge some ids.
    assert compression.compressed_vocab_size < len(tokenizer)
    assert compression(np.asarray(case["input_ids"])).tolist() == case["compressed_input_ids"]
    assert int(compression.lookup[case["raw_pad_id"]]) == case["pad_id"]


def test_compression_passes_negative_ids_through() -> None:
    compression = CompressionMap(np.array([3, 1, 1, 0]), 4)
    assert compression(np.array([[0, -1, 2, 3]])).tolist() == [[3, -1, 1, 0]]


def test_is_prime_agrees_with_sieve() -> None:
    limit = 20000
    sieve = np.ones(limit, dtype=bool)
    sieve[:2] = False
    for p in range(2, int(limit**0.5) + 1):
        if sieve[p]:
            sieve[p * p :: p] = False
    assert [n for n in range(limit) if is_prime(n)] == np.flatnonzero(sieve).tolist()
    assert is_prime(2**61 - 1) and not is_prime((2**31 - 1) * (2**61 - 1))


def test_rejects_bad_shapes_and_configs() -> None:
    with pytest.raises(ValueError, match="max_ngram_size"):
        NgramHasher(10, [100], 1, 2, [0], 0, 0)
    with pytest.raises(ValueError, match="one size per n-gram order"):
        NgramHasher(10, [100], 3, 2, [0], 0, 0)
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        NgramHasher(10, [100, 100], 3, 2, [0], 0, 0).hash(np.arange(5))
