"""What is FLUX.1's own, on the flux-tiny preset: true CFG beside embedded guidance, T5 and pooled
CLIP embeds, packed latents, bfloat16 and its geometry. What every family shares is in test_family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from disagfusion.config import Settings
from disagfusion.models import model_directory
from disagfusion.models.flux import FAMILY
from disagfusion.protocol import JobSpec
from tests.models.split import assert_stock_image, denoised, generate

MODEL = "flux-tiny"


@pytest.fixture(scope="module")
def directory(tiny_models_dir: Path) -> Path:
    return model_directory(MODEL, Settings(models_dir=tiny_models_dir))


def job(**update) -> JobSpec:
    base = JobSpec(model=MODEL, prompt="A Lighthouse at dusk", negative_prompt="blurry", seed=7, steps=2,
                   height=64, width=64, guidance=1.0, embedded_guidance=3.5)
    return base.model_copy(update=update)


def test_split_run_in_bfloat16_is_pixel_identical_to_the_stock_pipeline(stages, stock_image) -> None:
    spec = job(width=96, guidance=4.5)
    assert_stock_image(stages(MODEL, "bfloat16"), spec, stock_image(spec, "bfloat16"))


def test_true_cfg_and_embedded_guidance_each_match_the_stock_pipeline_and_differ(stages, stock_image) -> None:
    images = {}
    for case, spec in {
        "plain": job(),
        "true cfg": job(guidance=4.0, negative_prompt="fog and rain"),
        "embedded guidance": job(embedded_guidance=7.0),
    }.items():
        [images[case]] = generate(stages(MODEL), [spec])
        np.testing.assert_array_equal(images[case], stock_image(spec), err_msg=case)
    assert not np.array_equal(images["true cfg"], images["embedded guidance"])
    assert not np.array_equal(images["true cfg"], images["plain"])
    assert not np.array_equal(images["embedded guidance"], images["plain"])


def test_negative_prompt_counts_only_with_guidance(stages) -> None:
    [unguided, other_negative] = [generate(stages(MODEL), [job(negative_prompt=n)])[0] for n in ("blurry", "dark")]
    np.testing.assert_array_equal(unguided, other_negative)
    [guided, guided_other] = [generate(stages(MODEL), [job(guidance=3.0, negative_prompt=n)])[0] for n in ("blurry", "dark")]
    assert not np.array_equal(guided, guided_other)


def test_embeds_are_t5_tokens_and_a_pooled_clip_output(stages) -> None:
    specs = [job(prompt="short"), job(prompt="a longer prompt " * 10, guidance=4.5), job(prompt="x", guidance=2.0)]
    unguided, guided, guided_too = stages(MODEL)["encode"].run(specs, [{}, {}, {}])
    assert set(guided_too) == set(guided) == set(unguided) | {"negative_prompt_embeds", "negative_pooled_prompt_embeds"}
    assert guided["prompt_embeds"].shape == guided["negative_prompt_embeds"].shape == (1, 512, 32)  # T5
    assert guided["pooled_prompt_embeds"].shape == (1, 16)  # CLIP's pooled output


def test_denoiser_hands_on_packed_latents(stages) -> None:
    # 8×12 latents in 2×2 patches of 16 channels.
    assert denoised(stages(MODEL), job(width=96)).shape == (1, 4 * 6, 64)


def test_geometry_comes_from_the_configs(directory: Path) -> None:
    geometry = FAMILY.geometry(directory)
    # The VAE scales by 8, and latents are packed in 2×2 patches.
    assert (geometry.vae_scale_factor, geometry.size_multiple) == (8, 16)
    assert (geometry.max_sequence_length, geometry.guidance) == (512, "embedded")
