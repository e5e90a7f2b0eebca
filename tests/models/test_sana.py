"""What is SANA's own, on the sana-tiny preset: the complex human instruction the stock call puts
before every prompt, its geometry (a DC-AE VAE and the pipeline's multiple of 32), and bfloat16.
What every family shares is in test_family."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SanaPipeline

from disagfusion.config import Settings
from disagfusion.models import model_directory
from disagfusion.models.sana import COMPLEX_HUMAN_INSTRUCTION, FAMILY, MAX_SEQUENCE_LENGTH
from disagfusion.protocol import JobSpec
from tests.models.split import generate, max_difference

MODEL = "sana-tiny"


def job(**update) -> JobSpec:
    base = JobSpec(model=MODEL, prompt="A Lighthouse at dusk", negative_prompt="blurry", seed=7, steps=3, height=64, width=64, guidance=4.5)
    return base.model_copy(update=update)


def test_the_instruction_is_the_stock_call_s_default() -> None:
    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert COMPLEX_HUMAN_INSTRUCTION == default and all(isinstance(line, str) and line for line in default)
    # encode_prompt, unlike __call__, adds no instruction unless given one.
    assert inspect.signature(SanaPipeline.encode_prompt).parameters["complex_human_instruction"].default is None


def test_prompt_embeds_include_the_complex_human_instruction(stages) -> None:
    spec = job()
    [encoded] = stages(MODEL)["encode"].run([spec], [{}])
    pipe = stages(MODEL)["encode"].pipe

    def encode(instruction: list[str] | None) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return pipe.encode_prompt(spec.prompt, negative_prompt=spec.negative_prompt, max_sequence_length=MAX_SEQUENCE_LENGTH,
                                      complex_human_instruction=instruction)

    embeds, mask, negative_embeds, negative_mask = encode(COMPLEX_HUMAN_INSTRUCTION)
    torch.testing.assert_close(encoded["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(encoded["prompt_attention_mask"], mask, rtol=0, atol=0)
    # The instruction goes before the prompt only: the negative is encoded as is.
    torch.testing.assert_close(encoded["negative_prompt_embeds"], negative_embeds, rtol=0, atol=0)
    plain_embeds, _, plain_negative, _ = encode(None)
    assert not torch.equal(encoded["prompt_embeds"], plain_embeds)
    torch.testing.assert_close(encoded["negative_prompt_embeds"], plain_negative, rtol=0, atol=0)


def test_geometry_comes_from_the_configs(tiny_models_dir: Path) -> None:
    geometry = FAMILY.geometry(model_directory(MODEL, Settings(models_dir=tiny_models_dir)))
    # The tiny DC-AE halves twice (real SANA's 32×); the stock pipeline wants multiples of 32 whatever the VAE.
    assert (geometry.vae_scale_factor, geometry.size_multiple) == (4, 32)
    assert (geometry.max_steps, geometry.max_sequence_length, geometry.guidance) == (1000, 300, "cfg")


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_split_run_in_bfloat16_is_pixel_identical_to_the_stock_pipeline(stages, stock_image, guidance: float) -> None:
    spec = job(width=96, guidance=guidance)
    [image] = generate(stages(MODEL, "bfloat16"), [spec])
    expected = stock_image(spec, "bfloat16")
    assert image.dtype == np.uint8 and image.shape == expected.shape == (64, 96, 3)
    print(f"sana bfloat16 split vs stock: max difference {max_difference(image, expected)}/255")
    np.testing.assert_array_equal(image, expected)
