"""The split Qwen-Image stages against the stock QwenImagePipeline, on the qwen-image-tiny preset."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline

from disagfusion.config import Settings
from disagfusion.models import check_spec, load_stage_model, model_directory
from disagfusion.models.base import SpecError, StageModel
from disagfusion.models.qwen_image import FAMILY, MAX_SEQUENCE_LENGTH
from disagfusion.protocol import STAGES, JobSpec
from tests.models.split import generate, handoff

MODEL = "qwen-image-tiny"


@pytest.fixture(scope="module")
def stages(tiny_models_dir: Path):
    @cache
    def load(dtype: str) -> dict[str, StageModel]:
        settings = Settings(models_dir=tiny_models_dir, dtype=dtype)
        return {stage: load_stage_model(MODEL, stage, settings) for stage in STAGES}

    return load


@pytest.fixture(scope="module")
def stock_pipe(tiny_models_dir: Path) -> QwenImagePipeline:
    pipe = QwenImagePipeline.from_pretrained(model_directory(MODEL, Settings(models_dir=tiny_models_dir)), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def job(prompt: str = "A lighthouse at dusk", **fields) -> JobSpec:
    return JobSpec(model=MODEL, prompt=prompt, **{"seed": 7, "steps": 2, "height": 64, "width": 64} | fields)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# Three prompts of different token counts, so a batch of them is padded.
BATCH = [("a cat", "", 1), ("two dogs on a beach at noon, photographed from far away", "ugly, blurry", 2), ("x", "dark", 3)]


@pytest.mark.parametrize(
    ("height", "width", "guidance", "negative_prompt", "dtype"),
    [
        (64, 64, 4.5, "blurry", "float32"),
        (64, 64, 1.0, "blurry", "float32"),  # not guided: the negative prompt plays no part
        (64, 96, 3.0, "", "float32"),  # guided with the default empty negative prompt (still true CFG)
        (96, 64, 1.0, "", "float32"),
        (64, 64, 4.5, "blurry", "bfloat16"),
        (64, 96, 1.0, "", "bfloat16"),
    ],
)
def test_split_run_is_pixel_identical_to_the_stock_pipeline(stages, stock_image, height, width, guidance, negative_prompt, dtype) -> None:
    spec = job(height=height, width=width, guidance=guidance, negative_prompt=negative_prompt)
    [image] = generate(stages(dtype), [spec])
    assert image.dtype == np.uint8 and image.shape == (height, width, 3)
    np.testing.assert_array_equal(image, stock_image(spec, dtype))


def test_a_batch_denoises_exactly_as_the_stock_pipeline_on_the_same_prompts(stages, stock_pipe) -> None:
    """The denoiser pads the jobs' embeds as the stock pipeline pads a list of prompts, so its
    latents are bitwise the stock pipeline's for that list. (Compared as latents: the stock
    pipeline decodes the list as one VAE batch, which rounds differently from the decoder's one
    job at a time; each job alone is decoded bitwise, see the test above.)"""
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
    encoded = [handoff(t) for t in stages("float32")["encode"].run(specs, [{} for _ in specs])]
    denoised = stages("float32")["denoise"].run(specs, encoded)
    for i, job_latents in enumerate(denoised):
        np.testing.assert_array_equal(job_latents["latents"].numpy(), stock[i : i + 1].numpy())


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_batched_jobs_match_running_each_alone(stages, guidance) -> None:
    """Measured: the padded batch (text encoder and DiT both see padding and a mask) rounds a
    little differently from each job alone, at most 1/255 in uint8."""
    specs = [job(prompt, negative_prompt=negative, seed=seed, width=96, guidance=guidance) for prompt, negative, seed in BATCH]
    batched = generate(stages("float32"), specs)
    alone = [generate(stages("float32"), [spec])[0] for spec in specs]
    worst = max(max_diff(a, b) for a, b in zip(batched, alone))
    print(f"batched vs alone, guidance {guidance}: max difference {worst}/255")
    assert worst <= 1
    assert not np.array_equal(batched[0], batched[2])  # the jobs did not get one another's images


def test_seed_prompt_and_guidance_change_the_image(stages) -> None:
    base = job("a red cat", guidance=4.5)
    [reference] = generate(stages("float32"), [base])
    for change in [{"seed": 4}, {"prompt": "a blue dog"}, {"negative_prompt": "blurry"}, {"guidance": 1.0}]:
        [changed] = generate(stages("float32"), [base.model_copy(update=change)])
        assert not np.array_equal(changed, reference), change


def test_encoder_hands_on_the_declared_tensors_unpadded(stages) -> None:
    specs = [job("short", guidance=1.0), job("a much longer prompt " * 5, guidance=4.5, negative_prompt="")]
    encoder = stages("float32")["encode"]
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


def test_each_stage_holds_only_its_own_components(stages, stock_pipe) -> None:
    def parameters(module: object) -> int:
        return sum(p.numel() for p in module.parameters()) if isinstance(module, torch.nn.Module) else 0

    everything = 0
    for name, stage in stages("float32").items():
        declared = FAMILY.stage_components[name]
        assert stage.loaded_components() == sorted(declared)
        resident = sum(parameters(module) for module in stage.pipe.components.values() if module is not None)
        assert resident == sum(parameters(stock_pipe.components[component]) for component in declared) > 0
        everything += resident
    assert everything == sum(parameters(module) for module in stock_pipe.components.values())


def test_denoiser_reports_every_step(stages) -> None:
    spec = job(steps=3)
    encoded = stages("float32")["encode"].run([spec], [{}])
    steps: list[tuple[int, int]] = []
    [out] = stages("float32")["denoise"].run([spec], encoded, lambda k, n: steps.append((k, n)))
    assert steps == [(k, 3) for k in range(1, 4)]
    assert out["latents"].shape == (1, (64 // 8) * (64 // 8), 64)  # packed 2x2: [1, seq, 4 * 16]


@pytest.mark.parametrize(
    ("update", "field"),
    [({"height": 60}, "height"), ({"width": 100}, "width"), ({"frames": 2}, "frames")],
)
def test_check_names_the_field(stages, tiny_models_dir: Path, update: dict, field: str) -> None:
    spec = job().model_copy(update=update)
    for stage in stages("float32").values():
        with pytest.raises(SpecError) as error:
            stage.check(spec)
        assert error.value.field == field
    with pytest.raises(SpecError) as error:
        check_spec(spec, Settings(models_dir=tiny_models_dir))
    assert error.value.field == field


def test_geometry_comes_from_the_configs(tiny_models_dir: Path) -> None:
    geometry = FAMILY.geometry(tiny_models_dir / MODEL)
    # The tiny VAE halves twice; the pipeline packs latents 2x2, so sizes are multiples of 8.
    assert (geometry.vae_scale_factor, geometry.size_multiple) == (4, 8)
    assert (geometry.max_steps, geometry.max_sequence_length, geometry.guidance) == (1000, 512, "cfg")


def test_the_chat_template_fits_the_preset_tokenizer(stages) -> None:
    """The encoder drops the pipeline's own count of template tokens (34, set in its __init__);
    with the tiny vocabulary that count still falls inside the system prompt."""
    pipe = stages("float32")["encode"].pipe
    system = pipe.prompt_template_encode.split("{}")[0]
    ids = pipe.tokenizer(system).input_ids
    assert pipe.prompt_template_encode_start_idx == 34 < len(ids)
    assert ids[0] == pipe.tokenizer.convert_tokens_to_ids("<|im_start|>")  # one special token, as in Qwen2
