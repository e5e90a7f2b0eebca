"""An Engram-augmented T5 text encoder gives identical outputs whichever place its rows come
from: the local arena mapping, the engram_store service, or in-process embeddings."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from disagfusion.engram.arena import Arena, HasherConfig, LookupRequestError, TableSpec
from disagfusion.engram.build import build, engram_specs, random_filler
from disagfusion.engram.client import EngramClient
from disagfusion.engram.hashing import CompressionMap
from disagfusion.config import Settings
from disagfusion.engram.module import ENGRAM_WEIGHTS, EmbeddingRows, EngramAugmentation, EngramLayer, attach_engram
from tests.engram.conftest import new_arena_path, start_engram_store, stop_engram_store

PROMPTS = ["a red fox in the snow", "Only Alexander the Great could tame the horse Bucephalus."]


@pytest.fixture(scope="module")
def tokenizer() -> ByT5Tokenizer:
    return ByT5Tokenizer()


@pytest.fixture(scope="module")
def arena_path(tokenizer: ByT5Tokenizer) -> Iterator[str]:
    compression = CompressionMap.from_tokenizer(tokenizer)
    config = HasherConfig(
        compressed_vocab_size=compression.compressed_vocab_size, engram_vocab_size=[211, 223], max_ngram_size=3,
        n_head_per_ngram=2, layer_ids=[0, 1], pad_id=int(compression.lookup[tokenizer.pad_token_id]), seed=0,
    )
    specs, layout = engram_specs(config, dim=8, dtype="float32")
    specs.append(TableSpec(name="compression", dtype="int64", rows=len(compression.lookup), dim=1))
    random_rows = random_filler(specs[:-1], seed=1, scale=1.0)

    def fill(builder) -> None:  # noqa: ANN001
        random_rows(builder)
        builder.table("compression")[:, 0] = compression.lookup

    path = str(new_arena_path())
    build(path, specs, fill, layout.model_copy(update={"compression_table": "compression"}))
    yield path
    Path(path).unlink()


def encoder(tokenizer: ByT5Tokenizer) -> T5EncoderModel:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=3, num_heads=2,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    )
    return T5EncoderModel(config).eval()


def encode(client: EngramClient, tokenizer: ByT5Tokenizer) -> torch.Tensor:
    model = encoder(tokenizer)
    torch.manual_seed(1)
    engram = EngramAugmentation(client, hidden_size=32, block_of_layer={0: 0, 1: 2}).eval()
    engram.attach(model)
    tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state


def test_outputs_equal_across_row_sources(arena_path: str, tokenizer: ByT5Tokenizer, nats_server: str, scratch_dir: str) -> None:
    with EngramClient.local(arena_path) as local:
        from_arena = encode(local, tokenizer)
    with Arena.open(arena_path) as arena:
        tables = {info.name: torch.from_numpy(arena.table(info.name).copy()) for info in arena.directory.tables}
        in_process = EngramClient(EmbeddingRows(tables, arena.directory))
    from_embedding = encode(in_process, tokenizer)
    proc = start_engram_store(nats_server, [arena_path], scratch_dir)
    try:
        with EngramClient.remote(nats_server, arena=Path(arena_path).stem) as remote:
            from_service = encode(remote, tokenizer)
    finally:
        stop_engram_store(proc)
    assert torch.equal(from_arena, from_embedding)
    assert torch.equal(from_arena, from_service)
    # And the Engram layers do change the encoding: the rows matter.
    tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = encoder(tokenizer)(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert not torch.allclose(plain, from_arena, atol=1e-3)


def test_gate_and_causality() -> None:
    torch.manual_seed(0)
    layer = EngramLayer(hidden_size=16, heads=4, head_dim=3, max_ngram_size=3).eval()
    hidden, rows = torch.randn(1, 10, 16), torch.randn(1, 10, 4, 3)
    out = layer(hidden, rows)
    assert out.shape == hidden.shape
    # Changing the rows of the last token leaves every earlier position as it was.
    changed = rows.clone()
    changed[0, -1] += 1
    again = layer(hidden, changed)
    assert torch.equal(out[0, :-1], again[0, :-1]) and not torch.equal(out[0, -1], again[0, -1])


def test_hooks_need_token_ids_and_known_layers(arena_path: str, tokenizer: ByT5Tokenizer) -> None:
    with EngramClient.local(arena_path) as client:
        with pytest.raises(LookupRequestError, match=r"Engram layers \[5\] are not in the arena"):
            EngramAugmentation(client, hidden_size=32, block_of_layer={5: 0})
        model = encoder(tokenizer)
        EngramAugmentation(client, hidden_size=32, block_of_layer={0: 0}).attach(model)
        with pytest.raises(LookupRequestError, match="needs input_ids"):
            model(inputs_embeds=torch.zeros(1, 3, 32))


def encode_with_settings(settings: Settings, tokenizer: ByT5Tokenizer, weights_dir: Path) -> torch.Tensor:
    model = encoder(tokenizer)
    engram = attach_engram(model, settings, weights_dir)
    assert engram is not None
    tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    engram.client.close()
    return out


def test_settings_pick_the_row_source_and_weights(
    arena_path: str, tokenizer: ByT5Tokenizer, nats_server: str, scratch_dir: str, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    assert attach_engram(encoder(tokenizer), Settings(), tmp_path) is None
    local = Settings(engram_arena=arena_path, engram_blocks="0:1,1:2")
    seeded = encode_with_settings(local, tokenizer, tmp_path)
    assert torch.equal(seeded, encode_with_settings(local, tokenizer, tmp_path))  # same seeded weights
    proc = start_engram_store(nats_server, [arena_path], scratch_dir)
    try:
        remote = Settings(engram_arena=f"nats:{Path(arena_path).stem}", nats_url=nats_server, engram_blocks="0:1,1:2")
        assert torch.equal(seeded, encode_with_settings(remote, tokenizer, tmp_path))
    finally:
        stop_engram_store(proc)
    # Saved weights replace the seeded ones.
    model = encoder(tokenizer)
    engram = attach_engram(model, local, tmp_path)
    save_file({k: torch.zeros_like(v) for k, v in engram.layers.state_dict().items()}, tmp_path / ENGRAM_WEIGHTS)
    engram.client.close()
    zeroed = encode_with_settings(local, tokenizer, tmp_path)
    tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = encoder(tokenizer)(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert torch.equal(zeroed, plain)  # zero projections add nothing
    assert not torch.equal(seeded, plain)


def test_tokenizer_supplies_the_compression_map_when_the_arena_has_none(tokenizer: ByT5Tokenizer, tmp_path: Path) -> None:
    compression = CompressionMap.from_tokenizer(tokenizer)
    config = HasherConfig(
        compressed_vocab_size=compression.compressed_vocab_size, engram_vocab_size=[101, 103], max_ngram_size=3,
        n_head_per_ngram=2, layer_ids=[0], pad_id=0, seed=3,
    )
    specs, layout = engram_specs(config, dim=4, dtype="float32")
    path = str(new_arena_path())
    try:
        build(path, specs, random_filler(specs, 0), layout)
        model = encoder(tokenizer)
        engram = attach_engram(model, Settings(engram_arena=path), tmp_path, tokenizer)
        tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            model(input_ids=tokens.input_ids)
        engram.client.close()
        wrong = config.model_copy(update={"compressed_vocab_size": 999})
        specs, layout = engram_specs(wrong, dim=4, dtype="float32")
        build(path, specs, random_filler(specs, 0), layout)
        with pytest.raises(LookupRequestError, match="compressed vocabulary of 999"):
            attach_engram(encoder(tokenizer), Settings(engram_arena=path), tmp_path, tokenizer)
    finally:
        Path(path).unlink(missing_ok=True)
