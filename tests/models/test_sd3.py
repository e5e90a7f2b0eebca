"""What is SD3's own, on the sd3-tiny preset: bfloat16 against a stock pipeline cast as
accelerate would cast it, the size limit of its position embeddings, its embeds and latents,
and its geometry. What every family shares is in test_family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from disagfusion.config import Settings
from disagfusion.limits import LimitError
from disagfusion.models import check_spec, model_directory
from disagfusion.models.base import SpecError
from disagfusion.models.sd3 import FAMILY
from disagfusion.protocol import JobSpec
from tests.models.split import assert_stock_image, denoised

MODEL = "sd3-tiny"


@pytest.fixture(scope="module")
def directory(tiny_models_dir: Path) -> Path:
    return model_directory(MODEL, Settings(models_dir=tiny_models_dir))


@pytest.fixture(scope="module")
def stock_bfloat16(directory: Path) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(directory, dtype=torch.bfloat16)
    # What from_pretrained does when accelerate is installed; without it diffusers 0.42 leaves
    # this DiT in float32 and the stock bfloat16 pipeline fails (see SD3Family.prepare).
    pipe.transformer.to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def job(**update) -> JobSpec:
    base = JobSpec(model=MODEL, prompt="A Lighthouse at dusk", negative_prompt="blurry", seed=7, steps=3, height=64, width=64, guidance=4.5)
    return base.model_copy(update=update)


def test_split_run_in_bfloat16_is_pixel_identical_to_the_cast_stock_pipeline(stages, stock_bfloat16) -> None:
    spec = job(width=96)
    assert_stock_image(stages(MODEL, "bfloat16"), spec, np.array(FAMILY.stock_call(stock_bfloat16, spec).images[0]))


def test_the_largest_side_its_position_embeddings_allow_is_pixel_identical(stages, stock_image) -> None:
    spec = job(height=256, width=32)
    assert_stock_image(stages(MODEL), spec, stock_image(spec))


def test_a_side_beyond_the_position_embeddings_is_refused_naming_it(stages, tiny_models_dir: Path) -> None:
    spec = job(width=272)  # a multiple of 16, but more than 256
    for stage in stages(MODEL).values():
        with pytest.raises(SpecError, match="position embeddings") as error:
            stage.check(spec)
        assert error.value.field == "width"
    with pytest.raises(SpecError) as error:
        check_spec(spec, Settings(models_dir=tiny_models_dir))
    assert error.value.field == "width"


def test_embeds_are_both_clips_then_t5(stages) -> None:
    [guided] = stages(MODEL)["encode"].run([job(prompt="a longer prompt " * 10)], [{}])
    # Both CLIPs (77 tokens each, side by side) then T5 (256 tokens), at the T5 width.
    assert guided["prompt_embeds"].shape == guided["negative_prompt_embeds"].shape == (1, 77 + 256, 48)
    assert guided["pooled_prompt_embeds"].shape == guided["negative_pooled_prompt_embeds"].shape == (1, 16 + 24)


def test_latents_have_16_channels_at_an_eighth_of_the_size(stages) -> None:
    assert denoised(stages(MODEL), job(steps=2)).shape == (1, 16, 8, 8)


def test_geometry_comes_from_the_configs(directory: Path) -> None:
    geometry = FAMILY.geometry(directory)
    # The VAE scales by 8 and the DiT patch is 2; 16 position embeddings a side.
    assert (geometry.vae_scale_factor, geometry.size_multiple, geometry.max_size) == (8, 16, 256)
    assert (geometry.max_sequence_length, geometry.guidance) == (256, "cfg")
    geometry.check(JobSpec(prompt="p", height=256, width=16))


def test_a_prompt_longer_than_its_t5_reads_is_refused_by_the_encoder_naming_the_count(stages) -> None:
    """The T5 reads 256 tokens (the CLIPs always truncate at 77, in the stock pipeline too): a
    prompt the T5 would truncate is refused at the encoder's check, with its count."""
    encoder = stages(MODEL)["encode"]
    encoder.check(job(prompt="a longer prompt " * 10))
    with pytest.raises(LimitError, match=r"prompt: \d+ tokens is longer than the limit of 256 tokens") as error:
        encoder.check(job(prompt="a longer prompt " * 100))
    assert error.value.field == "prompt"
    stages(MODEL)["denoise"].check(job(prompt="a longer prompt " * 100))  # the encoder's to say
