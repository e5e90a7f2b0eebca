"""What only HunyuanVideo does, on the hunyuan-video-tiny preset: the prompt template's crop_start,
true and embedded guidance, Llama and CLIP outputs, and a sharded fp16 checkpoint; what it shares
with the other video families (bitwise equal to the stock HunyuanVideoPipeline, stages, encoder,
batching, spec checks) is tested in test_video_family.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import HunyuanVideoPipeline
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from transformers import LlamaTokenizer

from disagfusion.config import Settings
from disagfusion.models import load_stage_model, model_directory
from disagfusion.models.hunyuan_video import FAMILY, MAX_SEQUENCE_LENGTH, prompt_template
from disagfusion.protocol import STAGES, JobSpec
from tests.models.split import frames

MODEL = "hunyuan-video-tiny"


@pytest.fixture(scope="module")
def directory(tiny_models_dir: Path) -> Path:
    return model_directory(MODEL, Settings(models_dir=tiny_models_dir))


@pytest.fixture(scope="module")
def stock_pipe(stock_pipeline) -> HunyuanVideoPipeline:
    """The stock pipeline, loaded with ``from_pretrained`` once per session."""
    return stock_pipeline(MODEL)[1]


def job(**update) -> JobSpec:
    base = JobSpec(model=MODEL, prompt="A lighthouse at dusk, waves rolling in", negative_prompt="blurry", seed=7,
                   steps=2, height=32, width=32, frames=5, guidance=1.0, embedded_guidance=6.0)
    return base.model_copy(update=update)


def test_true_cfg_and_embedded_guidance_each_match_the_stock_pipeline_and_differ(stages, stock_frames) -> None:
    videos = {}
    for case, spec in {
        "plain": job(),
        "true cfg": job(guidance=4.0, negative_prompt="fog and rain"),
        "embedded guidance": job(embedded_guidance=2.0),
    }.items():
        videos[case] = frames(stages(MODEL), spec)
        np.testing.assert_array_equal(videos[case], stock_frames(spec), err_msg=case)
    assert not np.array_equal(videos["true cfg"], videos["embedded guidance"])
    assert not np.array_equal(videos["true cfg"], videos["plain"])
    assert not np.array_equal(videos["embedded guidance"], videos["plain"])


def test_prompt_template_crop_start_is_counted_for_the_tokenizer(stock_pipe: HunyuanVideoPipeline) -> None:
    tokenizer = stock_pipe.tokenizer
    assert isinstance(tokenizer, LlamaTokenizer) and tokenizer.padding_side == "right"
    template = prompt_template(tokenizer)
    assert template["template"] == DEFAULT_PROMPT_TEMPLATE["template"]
    crop = template["crop_start"]
    assert crop != DEFAULT_PROMPT_TEMPLATE["crop_start"]  # 95 is the real Llama 3 vocabulary's count
    for prompt in ("A lighthouse at dusk", "x", "héllo wörld"):
        ids = tokenizer(template["template"].format(prompt)).input_ids
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        # The crop keeps the prompt and the template's closing <|eot_id|>, nothing of what precedes it.
        assert tokenizer.convert_ids_to_tokens(ids[crop - 3 : crop]) == ["<|end_header_id|>", "<0x0A>", "<0x0A>"]
        assert tokenizer.convert_ids_to_tokens(ids[-1:]) == ["<|eot_id|>"]
        assert tokenizer.decode(ids[crop:-1]) == prompt
        assert len(ids) - crop - 1 <= len(prompt_ids) + 1  # the prompt's tokens, give or take a prefix space
        embeds, _, mask = stock_pipe.encode_prompt(prompt, prompt_template=template, max_sequence_length=MAX_SEQUENCE_LENGTH)
        assert embeds.shape[1] == MAX_SEQUENCE_LENGTH and int(mask.sum()) == len(ids) - crop


def test_encoder_hands_on_llama_masks_and_clips_pooled_output(stages) -> None:
    specs = [job(prompt="short"), job(prompt="a longer prompt " * 100, guidance=4.5)]
    unguided, guided = stages(MODEL)["encode"].run(specs, [{}, {}])
    assert set(unguided) == {"prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask"}
    assert guided["prompt_embeds"].shape == guided["negative_prompt_embeds"].shape == (1, 256, 32)  # Llama
    assert guided["prompt_attention_mask"].shape == guided["negative_prompt_attention_mask"].shape == (1, 256)
    assert guided["pooled_prompt_embeds"].shape == (1, 16)  # CLIP's pooled output
    assert int(guided["prompt_attention_mask"].sum()) == 256  # the long prompt is truncated
    assert 0 < int(unguided["prompt_attention_mask"].sum()) < 10


def test_geometry_comes_from_the_configs(directory: Path) -> None:
    geometry = FAMILY.geometry(directory)
    # 8× VAE and 2×2 patches (the pipeline asks for multiples of 16 anyway); frames 4k + 1.
    assert (geometry.vae_scale_factor, geometry.size_multiple, geometry.temporal_factor) == (8, 16, 4)
    assert (geometry.max_sequence_length, geometry.guidance) == (256, "embedded")
    for count in (1, 5, 9, 129):
        geometry.check(job(frames=count))


def test_a_sharded_fp16_variant_loads_per_stage(directory: Path, tmp_path: Path) -> None:
    """As real checkpoints are saved: fp16 weights as the ``fp16`` variant, in shards, and a
    model_index.json naming the fast tokenizer classes."""
    checkpoint = tmp_path / MODEL
    HunyuanVideoPipeline.from_pretrained(directory).to(torch.float16).save_pretrained(
        checkpoint, variant="fp16", max_shard_size="20KB"
    )
    index = json.loads((checkpoint / "model_index.json").read_text())
    index["tokenizer"][1], index["tokenizer_2"][1] = "LlamaTokenizerFast", "CLIPTokenizerFast"
    (checkpoint / "model_index.json").write_text(json.dumps(index))
    assert list(checkpoint.glob("*/*.fp16-0000*-of-*.safetensors"))
    settings = Settings(models_dir=tmp_path, variant="fp16")
    spec = job(guidance=4.5)
    video = frames({stage: load_stage_model(MODEL, stage, settings) for stage in STAGES}, spec)
    stock = HunyuanVideoPipeline.from_pretrained(checkpoint, variant="fp16", dtype=torch.float32)
    stock.set_progress_bar_config(disable=True)
    expected = np.stack([np.array(frame) for frame in FAMILY.stock_call(stock, spec).frames[0]])
    np.testing.assert_array_equal(video, expected)
