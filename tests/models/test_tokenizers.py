"""The built-in tokenizers: real transformers classes that reload from disk unchanged, come out
byte-identical in every process, and split and pad prompts the way the pipelines call them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, CLIPTokenizer, GemmaTokenizer, Qwen2Tokenizer, T5Tokenizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

import disagfusion.models.tokenizers as built_in

BUILDS: dict[str, tuple[str, dict[str, Any]]] = {
    "clip": ("clip_tokenizer", {}),
    "clip-pad-!": ("clip_tokenizer", {"pad_token": "!"}),  # SD3's tokenizer_2
    "t5": ("t5_tokenizer", {}),
    "gemma": ("gemma_tokenizer", {}),
    "qwen2": ("qwen2_tokenizer", {}),
}
"""Name -> (function in disagfusion.models.tokenizers, its arguments)."""

CLASSES = {
    "clip": CLIPTokenizer, "clip-pad-!": CLIPTokenizer, "t5": T5Tokenizer,
    "gemma": GemmaTokenizer, "qwen2": Qwen2Tokenizer,
}

PROMPTS = [
    "a red cat sitting on a wooden chair, oil painting",
    "A photo of 3 penguins at dawn; 35mm lens, bokeh!",
    "héllo wörld — 日本語 🐱",
    "",
    "  extra   spaces\tand\nnew lines  ",
]

# How each pipeline (diffusers 0.42.1) pads: SD3 / FLUX CLIP to 77, SD3 T5 to 256, SANA Gemma to
# max_sequence_length 300 on the right, Qwen-Image to the longest prompt.
PIPELINE_CALLS: dict[str, dict[str, Any]] = {
    "clip": dict(padding="max_length", max_length=77, truncation=True),
    "clip-pad-!": dict(padding="max_length", max_length=77, truncation=True),
    "t5": dict(padding="max_length", max_length=256, truncation=True, add_special_tokens=True),
    "gemma": dict(padding="max_length", max_length=300, truncation=True, add_special_tokens=True),
    "qwen2": dict(padding=True, max_length=1024 + 34, truncation=True),
}

QWEN_IMAGE_TEMPLATE = (  # QwenImagePipeline.prompt_template_encode
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, PreTrainedTokenizerBase]:
    return {name: getattr(built_in, function)(**kwargs) for name, (function, kwargs) in BUILDS.items()}


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {str(f.relative_to(directory)): f.read_bytes() for f in sorted(directory.rglob("*")) if f.is_file()}


def test_each_is_its_real_class(tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    for name, tokenizer in tokenizers.items():
        assert type(tokenizer) is CLASSES[name]
        if name == "t5":  # a unigram model stops short on a small corpus; T5 adds 100 sentinels
            assert 500 + 100 <= len(tokenizer) <= 1000 + 100
        else:
            assert len(tokenizer) == 1000


def test_special_tokens_sit_where_the_real_ones_do(tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    clip, clip_2, t5, gemma, qwen = (tokenizers[n] for n in BUILDS)
    assert (clip.bos_token_id, clip.eos_token_id, clip.pad_token_id) == (len(clip) - 2, len(clip) - 1, len(clip) - 1)
    assert clip.convert_ids_to_tokens([0, 256, 255 + 256]) == ["!", "!</w>", clip.convert_ids_to_tokens(255) + "</w>"]
    assert (clip_2.pad_token, clip_2.pad_token_id) == ("!", 0)
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5.convert_tokens_to_ids("<extra_id_0>") == len(t5) - 1
    assert (gemma.pad_token_id, gemma.eos_token_id, gemma.bos_token_id, gemma.unk_token_id) == (0, 1, 2, 3)
    assert gemma.convert_tokens_to_ids(["<0x00>", "<0xFF>"]) == [5, 260]
    specials = qwen.convert_tokens_to_ids(list(built_in.QWEN2_SPECIAL_TOKENS))
    assert specials == list(range(len(qwen) - len(specials), len(qwen)))
    assert (qwen.pad_token, qwen.eos_token) == ("<|endoftext|>", "<|im_end|>")


@pytest.mark.parametrize("name", list(BUILDS))
def test_saved_and_reloaded_gives_the_same_ids(
    name: str, tokenizers: dict[str, PreTrainedTokenizerBase], tmp_path: Path
) -> None:
    tokenizer = tokenizers[name]
    tokenizer.save_pretrained(tmp_path)
    call = PIPELINE_CALLS[name]
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), CLASSES[name].from_pretrained(tmp_path)):
        assert type(loaded) is type(tokenizer)
        assert (len(loaded), loaded.all_special_ids) == (len(tokenizer), tokenizer.all_special_ids)
        for prompt in PROMPTS:
            assert loaded(prompt).input_ids == tokenizer(prompt).input_ids
        assert loaded(PROMPTS, **call).input_ids == tokenizer(PROMPTS, **call).input_ids


def test_every_process_builds_the_same_bytes(tmp_path: Path) -> None:
    # Two fresh interpreters with different hash seeds, against a build here: set and dict orders,
    # and anything seeded per process (Rust hash maps), differ between them. Not the module's
    # fixture: a tokenizer that has truncated or padded saves that setting in tokenizer.json.
    script = (
        "import json, sys\n"
        "import disagfusion.models.tokenizers as built_in\n"
        "for name, (function, kwargs) in json.loads(sys.argv[2]).items():\n"
        "    getattr(built_in, function)(**kwargs).save_pretrained(f'{sys.argv[1]}/{name}')\n"
    )
    root = Path(built_in.__file__).parents[2]  # the copy under test, not an installed one
    runs = []
    for seed in ("1", "2"):
        path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": path}
        command = [sys.executable, "-c", script, str(tmp_path / seed), json.dumps(BUILDS)]
        runs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for run in runs:
        output, _ = run.communicate(timeout=120)
        assert run.returncode == 0, output
    for name, (function, kwargs) in BUILDS.items():
        getattr(built_in, function)(**kwargs).save_pretrained(tmp_path / "here" / name)
    here = file_bytes(tmp_path / "here")
    assert here and file_bytes(tmp_path / "1") == here == file_bytes(tmp_path / "2")


@pytest.mark.parametrize("name", list(BUILDS))
def test_english_prompts_split_into_word_sized_tokens(
    name: str, tokenizers: dict[str, PreTrainedTokenizerBase]
) -> None:
    tokenizer = tokenizers[name]
    for prompt in ("a red cat in a garden, oil painting", "A majestic golden dragon flying above the clouds"):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert len(prompt.split()) <= len(ids) < len(prompt) / 2
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids).replace(" ", "").lower() == prompt.replace(" ", "").lower()


@pytest.mark.parametrize("name", list(BUILDS))
def test_pads_as_the_pipeline_calls_it(name: str, tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    tokenizer = tokenizers[name]
    tokenizer.padding_side = "right"  # SanaPipeline sets it; every other real one pads right already
    prompts = ["a cat", "a tiny red fox sitting on a wooden chair in a misty forest, watercolor"]
    call = PIPELINE_CALLS[name]
    batch = tokenizer(prompts, return_tensors="pt", **call)
    alone = [tokenizer(p, add_special_tokens=call.get("add_special_tokens", True)).input_ids for p in prompts]
    width = call["max_length"] if call["padding"] == "max_length" else max(map(len, alone))
    assert batch.input_ids.shape == (2, width)
    for row, mask, ids in zip(batch.input_ids.tolist(), batch.attention_mask.tolist(), alone, strict=True):
        assert row == ids + [tokenizer.pad_token_id] * (width - len(ids))
        assert mask == [1] * len(ids) + [0] * (width - len(ids))
    long = tokenizer(" ".join(prompts * 100), **call).input_ids
    assert len(long) == call["max_length"]
    if name in ("clip", "clip-pad-!", "t5"):  # these end every sequence, truncated or not
        assert long[-1] == tokenizer.eos_token_id


def test_qwen_image_template_prefix_has_a_fixed_length(tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    # QwenImagePipeline drops prompt_template_encode_start_idx tokens, the system prompt's: that
    # count must not depend on the prompt, and the chat markers must be single tokens.
    qwen = tokenizers["qwen2"]
    prefix = qwen(QWEN_IMAGE_TEMPLATE.split("{}")[0]).input_ids
    assert prefix[0] == qwen.convert_tokens_to_ids("<|im_start|>")
    for prompt in PROMPTS[:3]:
        ids = qwen(QWEN_IMAGE_TEMPLATE.format(prompt)).input_ids
        assert ids[: len(prefix)] == prefix
        assert qwen.decode(ids[len(prefix) :]) == prompt + "<|im_end|>\n<|im_start|>assistant\n"
