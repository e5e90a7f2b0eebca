"""Engram N-gram hashing, bit-identical to DeepSeek's reference ``NgramHashMapping``
(deepseek-ai/Engram, engram_demo_v1.py), and the tokenizer compression map it runs on.

The hash of a position depends only on the token ids at and before it, so the table rows a
layer will read are known as soon as the prompt is tokenized: that is what makes prefetch work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from tokenizers import Regex, normalizers

INT64_MAX = int(np.iinfo(np.int64).max)
LAYER_SEED_STRIDE = 10007
"""Each layer's multipliers come from rng(seed + 10007 * layer), as in the reference."""

_MILLER_RABIN_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin; these bases are exact for every n below 3.3e24,
    far beyond any table size."""
    if n < 2:
        return False
    for p in _MILLER_RABIN_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MILLER_RABIN_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def layer_multipliers(seed: int, layer: int, compressed_vocab_size: int, max_ngram_size: int) -> np.ndarray:
    # Odd multipliers below half of INT64_MAX // vocab keep id * multiplier from being degenerate
    # while still wrapping like the reference does for large ids.
    half_bound = max(1, (INT64_MAX // compressed_vocab_size) // 2)
    rng = np.random.default_rng(int(seed + LAYER_SEED_STRIDE * int(layer)))
    r = rng.integers(low=0, high=half_bound, size=(max_ngram_size,), dtype=np.int64)
    return r * 2 + 1


def head_primes(
    engram_vocab_size: Sequence[int], max_ngram_size: int, n_head_per_ngram: int, layer_ids: Sequence[int]
) -> dict[int, list[list[int]]]:
    """Table size of every head: ``primes[layer][order - 2][head]``, all distinct across layers."""
    taken: set[int] = set()
    primes: dict[int, list[list[int]]] = {}
    for layer in layer_ids:
        per_order: list[list[int]] = []
        for order in range(2, max_ngram_size + 1):
            candidate = int(engram_vocab_size[order - 2]) - 1
            heads: list[int] = []
            for _ in range(n_head_per_ngram):
                candidate += 1
                while not is_prime(candidate) or candidate in taken:
                    candidate += 1
                taken.add(candidate)
                heads.append(candidate)
            per_order.append(heads)
        primes[int(layer)] = per_order
    return primes


class NgramHasher:
    """Hashes compressed token ids into per-head row ids of each Engram layer's table."""

    def __init__(
        self,
        compressed_vocab_size: int,
        engram_vocab_size: Sequence[int],
        max_ngram_size: int,
        n_head_per_ngram: int,
        layer_ids: Sequence[int],
        pad_id: int,
        seed: int,
    ) -> None:
        if max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be at least 2, got {max_ngram_size}")
        if len(engram_vocab_size) < max_ngram_size - 1:
            raise ValueError(
                f"engram_vocab_size needs one size per n-gram order 2..{max_ngram_size}, got {list(engram_vocab_size)}"
            )
        if compressed_vocab_size < 1:
            raise ValueError(f"compressed_vocab_size must be positive, got {compressed_vocab_size}")
        self.compressed_vocab_size = int(compressed_vocab_size)
        self.engram_vocab_size = [int(v) for v in engram_vocab_size]
        self.max_ngram_size = int(max_ngram_size)
        self.n_head_per_ngram = int(n_head_per_ngram)
        self.layer_ids = [int(layer) for layer in layer_ids]
        self.pad_id = int(pad_id)
        self.seed = int(seed)
        self.multipliers: dict[int, np.ndarray] = {
            layer: layer_multipliers(self.seed, layer, self.compressed_vocab_size, self.max_ngram_size)
            for layer in self.layer_ids
        }
        self.primes = head_primes(self.engram_vocab_size, self.max_ngram_size, self.n_head_per_ngram, self.layer_ids)

    @property
    def heads_per_layer(self) -> int:
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    def head_sizes(self, layer: int) -> list[int]:
        """Table sizes of a layer's heads in column order (order, then head)."""
        return [p for per_order in self.primes[layer] for p in per_order]

    def head_offsets(self, layer: int) -> np.ndarray:
        """Where each head's rows start in the layer's single concatenated table."""
        sizes = self.head_sizes(layer)
        return np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.int64)

    def table_rows(self, layer: int) -> int:
        return sum(self.head_sizes(layer))

    def hash_layer(self, ids: np.ndarray, layer: int) -> np.ndarray:
        x = np.asarray(ids, dtype=np.int64)
        if x.ndim != 2:
            raise ValueError(f"ids must be [batch, tokens], got shape {x.shape}")
        batch, tokens = x.shape
        multipliers = self.multipliers[layer]
        out = np.empty((batch, tokens, self.heads_per_layer), dtype=np.int64)
        mix = x * multipliers[0]
        column = 0
        for order in range(2, self.max_ngram_size + 1):
            k = order - 1
            shifted = np.full_like(x, self.pad_id)
            if tokens > k:
                shifted[:, k:] = x[:, : tokens - k]
            # int64 products wrap around exactly like the reference's numpy arithmetic.
            mix = np.bitwise_xor(mix, shifted * multipliers[k])
            for prime in self.primes[layer][order - 2]:
                out[:, :, column] = mix % prime
                column += 1
        return out

    def hash(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """``{layer: int64 [B, T, (N-1)*K]}`` from compressed ids ``[B, T]``."""
        return {layer: self.hash_layer(ids, layer) for layer in self.layer_ids}


class Tokenizer(Protocol):
    def __len__(self) -> int: ...
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...
    def convert_ids_to_tokens(self, ids: int) -> str: ...


_REPLACEMENT_CHAR = "\ufffd"
_SPACE_SENTINEL = "\ue000"


def token_text_normalizer() -> normalizers.Normalizer:
    """NFKC, NFD, strip accents, lowercase, collapse whitespace runs, strip. A token that is a
    lone space keeps its space (through a private-use sentinel) instead of becoming empty."""
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SPACE_SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SPACE_SENTINEL, " "),
        ]
    )


class CompressionMap:
    """Maps tokenizer ids onto compressed ids: tokens that normalize to the same text share one."""

    def __init__(self, lookup: np.ndarray, compressed_vocab_size: int) -> None:
        self.lookup = np.asarray(lookup, dtype=np.int64)
        self.compressed_vocab_size = int(compressed_vocab_size)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> CompressionMap:
        normalizer = token_text_normalizer()
        key_to_new: dict[str, int] = {}
        lookup = np.empty(len(tokenizer), dtype=np.int64)
        for tid in range(len(tokenizer)):
            text = tokenizer.decode([tid], skip_special_tokens=False)
            if _REPLACEMENT_CHAR in text:
                key = tokenizer.convert_ids_to_tokens(tid)
            else:
                key = normalizer.normalize_str(text) or text
            lookup[tid] = key_to_new.setdefault(key, len(key_to_new))
        return cls(lookup, len(key_to_new))

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """Negative ids (padding markers) pass through unchanged, as in the reference."""
        arr = np.asarray(ids, dtype=np.int64)
        out = arr.copy()
        valid = arr >= 0
        if valid.any() and int(arr[valid].max()) >= len(self.lookup):
            raise ValueError(f"token id {int(arr[valid].max())} is outside the tokenizer's {len(self.lookup)} ids")
        out[valid] = self.lookup[arr[valid]]
        return out
