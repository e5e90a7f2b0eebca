"""What is Qwen-Image's own, on the qwen-image-tiny preset: embeds of each prompt's own length, a
batch padded as the stock pipeline pads a list of prompts, the chat template it drops, bfloat16
and its geometry. What every family shares is in test_family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline

from disagfusion.models.qwen_image import FAMILY, MAX_SEQUENCE_LENGTH
from disagfusion.protocol import JobSpec
from tests.models.split import assert_stock_image, denoised, handoff

MODEL = "qwen-image-tiny"


@pytest.fixture(scope="module")
def stock_pipe(stock_pipeline) -> QwenImagePipeline:
    return stock_pipeline(MODEL)[1]


def job(prompt: str = "A lighthouse at dusk", **fields) -> JobSpec:
    return JobSpec(model=MODEL, prompt=prompt, **{"seed": 7, "steps": 2, "height": 64, "width": 64} | fields)


# Three prompts of different token counts, so a batch of them is padded.
BATCH = [("a cat", "", 1), ("two dogs on a beach at noon, photographed from far away", "ugly, blurry", 2), ("x", "dark", 3)]


@pytest.mark.parametrize(
    ("height", "width", "guidance", "negative_prompt", "dtype"),
    [
        (64, 96, 3.0, "", "float32"),  # guided with the default empty negative prompt (still true CFG)
        (64, 64, 4.5, "blurry", "bfloat16"),
        (64, 96, 1.0, "", "bfloat16"),
    ],
)
def test_split_run_is_pixel_identical_to_the_stock_pipeline(stages, stock_image, height, width, guidance, negative_prompt, dtype) -> None:
    """What test_family does not run: an empty negative prompt under guidance, and bfloat16."""
    spec = job(height=height, width=width, guidance=guidance, negative_prompt=negative_prompt)
    assert_stock_image(stages(MODEL, dtype), spec, stock_image(spec, dtype))


def test_a_batch_denoises_exactly_as_the_stock_pipeline_on_the_same_prompts(stages, stock_pipe) -> None:
    """The denoiser pads the jobs' embeds as the stock pipeline pads a list of prompts, so its
    latents are bitwise the stock pipeline's for that list. (Compared as latents: the stock
    pipeline decodes the list as one VAE batch, which rounds differently from the decoder's one
    job at a time; each job alone is decoded bitwise, see test_family.)"""
    specs = [job(prompt, negative_prompt=negative, seed=seed, width=96, guidance=4.5) for prompt, negative, seed in BATCH]
    stock = stock_pipe(
        [spec.prompt for spec in specs],
        negative_prompt=[spec.negative_prompt for spec in specs],
        true_cfg_scale=4.5,
        num_inference_steps=2,
        height=64,
        width=96,
        generator=[torch.Generator().manual_seed(spec.seed) for spec in specs],
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        output_type="latent",
    ).images
    encoded = [handoff(t) for t in stages(MODEL)["encode"].run(specs, [{} for _ in specs])]
    denoised = stages(MODEL)["denoise"].run(specs, encoded)
    for i, job_latents in enumerate(denoised):
        np.testing.assert_array_equal(job_latents["latents"].numpy(), stock[i : i + 1].numpy())


def test_encoder_hands_on_the_declared_tensors_unpadded(stages) -> None:
    specs = [job("short", guidance=1.0), job("a much longer prompt " * 5, guidance=4.5, negative_prompt="")]
    encoder = stages(MODEL)["encode"]
    unguided, guided = encoder.run(specs, [{}, {}])
    assert set(unguided) == {"prompt_embeds"}
    assert set(guided) == {"prompt_embeds", "negative_prompt_embeds"} == set(FAMILY.handoff["encode"])
    # Each job keeps its own token count, not the batch's longest; alone it encodes the same.
    assert unguided["prompt_embeds"].shape[1] < guided["prompt_embeds"].shape[1]
    for spec, together in zip(specs, [unguided, guided]):
        [alone] = encoder.run([spec], [{}])
        assert together.keys() == alone.keys()
        for name, tensor in alone.items():
            assert tensor.shape[0] == 1 and tensor.shape == together[name].shape
            torch.testing.assert_close(together[name], tensor, rtol=0, atol=1e-5)


def test_denoiser_hands_on_packed_latents(stages) -> None:
    assert denoised(stages(MODEL), job()).shape == (1, (64 // 8) * (64 // 8), 64)  # packed 2x2: [1, seq, 4 * 16]


def test_geometry_comes_from_the_configs(tiny_models_dir: Path) -> None:
    geometry = FAMILY.geometry(tiny_models_dir / MODEL)
    # The tiny VAE halves twice; the pipeline packs latents 2x2, so sizes are multiples of 8.
    assert (geometry.vae_scale_factor, geometry.size_multiple) == (4, 8)
    assert (geometry.max_steps, geometry.max_sequence_length, geometry.guidance) == (1000, 512, "cfg")


def test_the_chat_template_fits_the_preset_tokenizer(stages) -> None:
    """The encoder drops the pipeline's own count of template tokens (34, set in its __init__);
    with the tiny vocabulary that count still falls inside the system prompt."""
    pipe = stages(MODEL)["encode"].pipe
    system = pipe.prompt_template_encode.split("{}")[0]
    ids = pipe.tokenizer(system).input_ids
    assert pipe.prompt_template_encode_start_idx == 34 < len(ids)
    assert ids[0] == pipe.tokenizer.convert_tokens_to_ids("<|im_start|>")  # one special token, as in Qwen2
