"""The Engram layer (the reference's gated lookup, one hyper-connection stream) and the hook
that adds it to layers of a Hugging Face T5 text encoder, reading rows through EngramClient.

Per Engram layer: keys and values are projections of the concatenated hashed embeddings; a
gate compares the RMS-normed key with the RMS-normed hidden state (signed square root, then a
sigmoid); the gated value plus a short causal depthwise convolution of it is added to the
hidden state before the layer runs.
"""

from __future__ import annotations

import math
from pathlib import Path
import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import T5EncoderModel

from disagfusion.config import Settings
from disagfusion.engram.arena import ArenaDirectory, LookupRequestError
from disagfusion.engram.client import EngramClient, PrefetchHandle
from disagfusion.engram.hashing import CompressionMap, Tokenizer


class ShortConv(nn.Module):
    """RMSNorm, a causal depthwise convolution (dilated by the largest n-gram order), SiLU."""

    def __init__(self, hidden_size: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=1e-5)
        self.conv = nn.Conv1d(
            hidden_size, hidden_size, kernel_size, groups=hidden_size, bias=False,
            padding=(kernel_size - 1) * dilation, dilation=dilation,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[1]
        y = self.conv(self.norm(x).transpose(1, 2))[..., :tokens]  # keep the causal part
        return nn.functional.silu(y).transpose(1, 2)


class EngramLayer(nn.Module):
    def __init__(self, hidden_size: int, heads: int, head_dim: int, max_ngram_size: int, kernel_size: int = 4) -> None:
        super().__init__()
        engram_size = heads * head_dim
        self.hidden_size = hidden_size
        self.value_proj = nn.Linear(engram_size, hidden_size)
        self.key_proj = nn.Linear(engram_size, hidden_size)
        self.key_norm = nn.RMSNorm(hidden_size)
        self.query_norm = nn.RMSNorm(hidden_size)
        self.short_conv = ShortConv(hidden_size, kernel_size, dilation=max_ngram_size)

    def forward(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """``hidden`` [B, T, hidden], ``embeddings`` [B, T, heads, head_dim] -> the addition."""
        e = embeddings.flatten(start_dim=-2).to(hidden.dtype)
        key = self.key_norm(self.key_proj(e))
        gate = (key * self.query_norm(hidden)).sum(dim=-1) / math.sqrt(self.hidden_size)
        gate = (gate.abs().clamp_min(1e-6).sqrt() * gate.sign()).sigmoid().unsqueeze(-1)
        value = gate * self.value_proj(e)
        return value + self.short_conv(value)


class EmbeddingRows:
    """Rows from in-process tensors (the reference's MultiHeadEmbedding): a RowSource for
    EngramClient, to compare against the arena with the same weights."""

    def __init__(self, tables: dict[str, torch.Tensor], directory: ArenaDirectory) -> None:
        self.tables = tables
        self.directory = directory

    def gather(self, table: str, ids: np.ndarray) -> np.ndarray:
        if table not in self.tables:
            raise LookupRequestError(f"no table {table!r}")
        flat = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64).reshape(-1))
        return nn.functional.embedding(flat, self.tables[table]).numpy()

    def close(self) -> None:
        pass


class EngramAugmentation(nn.Module):
    """Engram layers for some blocks of a T5 encoder. Attached, the encoder starts the
    prefetch as soon as it is called with the tokenized prompt, and the first Engram block
    waits for the rows: the embedding and every block before it run while they are fetched."""

    def __init__(self, client: EngramClient, hidden_size: int, block_of_layer: dict[int, int]) -> None:
        super().__init__()
        if client.hasher is None or client.layout is None:
            raise LookupRequestError("the arena has no Engram layout")
        hasher = client.hasher
        missing = set(block_of_layer) - set(hasher.layer_ids)
        if missing:
            raise LookupRequestError(f"Engram layers {sorted(missing)} are not in the arena (it has {hasher.layer_ids})")
        head_dim = client.directory.table(client.layout.layer_tables[hasher.layer_ids[0]]).dim
        self.client = client
        self.block_of_layer = block_of_layer
        self.layers = nn.ModuleDict(
            {str(layer): EngramLayer(hidden_size, hasher.heads_per_layer, head_dim, hasher.max_ngram_size) for layer in block_of_layer}
        )
        self._handle: PrefetchHandle | None = None
        self._rows: dict[int, torch.Tensor] | None = None

    def attach(self, encoder: T5EncoderModel) -> None:
        encoder.register_forward_pre_hook(self._start_prefetch, with_kwargs=True)
        for layer, block in self.block_of_layer.items():
            encoder.encoder.block[block].register_forward_pre_hook(self._add_engram(layer))

    def _start_prefetch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise LookupRequestError("an Engram encoder needs input_ids: its rows are addressed by token ids")
        self._handle, self._rows = self.client.prefetch(input_ids), None

    def _add_engram(self, layer: int):  # noqa: ANN202 - a torch pre-hook
        def hook(module: nn.Module, args: tuple) -> tuple:
            if self._handle is None:
                raise RuntimeError("the Engram prefetch did not start: attach() to the T5EncoderModel, not its blocks")
            if self._rows is None:
                self._rows = self.client.wait(self._handle)
            hidden = args[0]
            return (hidden + self.layers[str(layer)](hidden, self._rows[layer]), *args[1:])

        return hook


ENGRAM_WEIGHTS = "engram.safetensors"
"""The Engram layers' weights, beside the text encoder's own (``text_encoder/engram.safetensors``)."""


def engram_client(settings: Settings, compression: CompressionMap | None = None) -> EngramClient:
    if settings.engram_arena.startswith("nats:"):
        name = settings.engram_arena.removeprefix("nats:") or None
        return EngramClient.remote(settings.nats_url, arena=name, reply=settings.engram_reply, compression=compression,
                                   tls=settings.nats_tls())
    return EngramClient.local(settings.engram_arena, compression=compression)


def attach_engram(
    encoder: T5EncoderModel, settings: Settings, weights_dir: Path, tokenizer: Tokenizer | None = None
) -> EngramAugmentation | None:
    """Give ``encoder`` the Engram layers ``settings`` asks for (None when DF_ENGRAM_ARENA is
    unset). Weights come from ``weights_dir/engram.safetensors``; without that file they are
    initialised from the arena's hash seed, so every encoder process builds the same ones.
    ``tokenizer`` supplies the compression map when the arena carries none."""
    if not settings.engram_arena:
        return None
    client = engram_client(settings)
    assert client.hasher is not None and client.layout is not None
    if client.layout.compression_table is None and tokenizer is not None:
        compression = CompressionMap.from_tokenizer(tokenizer)
        if compression.compressed_vocab_size != client.hasher.compressed_vocab_size:
            client.close()
            raise LookupRequestError(
                f"the arena was hashed for a compressed vocabulary of {client.hasher.compressed_vocab_size} "
                f"ids; this tokenizer compresses to {compression.compressed_vocab_size}"
            )
        client.compression_map = compression
    blocks = {
        int(layer): int(block)
        for layer, block in (pair.split(":") for pair in settings.engram_blocks.split(",") if pair.strip())
    } or {layer: layer for layer in client.hasher.layer_ids}
    beyond = {layer: block for layer, block in blocks.items() if not 0 <= block < len(encoder.encoder.block)}
    if beyond:
        client.close()
        raise LookupRequestError(
            f"DF_ENGRAM_BLOCKS sends Engram layers to blocks {beyond}; this encoder has "
            f"{len(encoder.encoder.block)} blocks (0..{len(encoder.encoder.block) - 1})"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(client.hasher.seed)
        engram = EngramAugmentation(client, encoder.config.d_model, blocks)
    weights = Path(weights_dir) / ENGRAM_WEIGHTS
    if weights.exists():
        engram.layers.load_state_dict(load_file(weights), strict=True)
    engram.to(device=encoder.device, dtype=encoder.dtype).eval()
    engram.attach(encoder)
    return engram
