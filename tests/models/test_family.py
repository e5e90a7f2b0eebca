"""What every diffusers family shares, checked on each family's tiny preset: the split stages
make the stock pipeline's image bit for bit, each stage holds only its own components, the
encoder hands on what the family declares, batching does not change a job's image, specs are
checked field by field, and a checkpoint saved the way real ones are (sharded, with an fp16
variant) loads per stage. What only one family does is tested in its own module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from disagfusion.config import Settings
from disagfusion.models import init_preset, load_stage_model, model_directory, model_family, weight_bytes
from disagfusion.models.family import DiffusersFamily, DiffusersStage
from disagfusion.protocol import STAGES, JobSpec
from tests.models.split import assert_refused, assert_batch_like_each_alone, assert_stock_image, generate, handoff

PRESETS = ["tiny", "sd3-tiny", "flux-tiny", "sana-tiny", "qwen-image-tiny"]
"""One preset per diffusers family."""

STEPS = {"tiny": 6, "sd3-tiny": 3, "flux-tiny": 2, "sana-tiny": 3, "qwen-image-tiny": 2}
"""Denoising steps per preset: enough for a multistep solver (PixArt's, SANA's) to use its
higher orders, few for the Euler ones."""

SIZES = {
    "tiny": [(64, 64), (64, 128)],
    "sd3-tiny": [(64, 64), (96, 64)],
    "flux-tiny": [(64, 64), (64, 96)],
    "sana-tiny": [(64, 64), (96, 64)],
    "qwen-image-tiny": [(64, 64), (64, 96)],
}
"""(height, width): a square and a non-square size per preset, multiples of its geometry's
``size_multiple`` (PixArt 8, SD3 16, FLUX 16, SANA 32, Qwen-Image 8)."""

LATENT_ATOL = {"tiny": 1e-3, "sd3-tiny": 1e-5, "flux-tiny": 1e-5, "sana-tiny": 1e-5, "qwen-image-tiny": 1e-5}
"""How far a batched job's latents may be from its latents alone. Measured (3 jobs, float32):
at most 2.2e-6 for the flow-matching families, whose latents stay near unit size; 3.1e-4 for
the tiny PixArt, whose unscaled latents reach 750 (a relative 4e-7)."""

SPEC = JobSpec(prompt="a lighthouse at dusk", negative_prompt="blurry", seed=5, steps=2, height=64, width=64, guidance=4.5)


def job(model: str, **update) -> JobSpec:
    base = JobSpec(model=model, prompt="A Lighthouse at dusk", negative_prompt="blurry", seed=7, steps=STEPS[model],
                   height=64, width=64, guidance=4.5)
    return base.model_copy(update=update)


def load_stock(directory: Path, **options) -> DiffusionPipeline:
    family = model_family(directory)
    pipe = family.pipeline_type().from_pretrained(directory, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def real_layout(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Each preset saved as real checkpoints are: fp16 weights as the ``fp16`` variant, in
    shards, and a model_index.json that names fast tokenizer classes."""

    def save(name: str) -> Path:
        directory = tmp_path_factory.mktemp("checkpoints") / name
        pipe = load_stock(model_directory(name, Settings(models_dir=tiny_models_dir)))
        pipe.to(torch.float16).save_pretrained(directory, variant="fp16", max_shard_size="20KB")
        index = json.loads((directory / "model_index.json").read_text())
        for component, value in index.items():
            if component.startswith("tokenizer") and value[1] in ("T5Tokenizer", "CLIPTokenizer"):
                value[1] += "Fast"
        (directory / "model_index.json").write_text(json.dumps(index))
        return directory

    return save


@pytest.mark.parametrize("name", PRESETS)
def test_a_sharded_fp16_variant_loads_per_stage(real_layout, name: str) -> None:
    directory = real_layout(name)
    shards = list(directory.glob("*/*.fp16-0000*-of-*.safetensors"))
    assert shards, "the checkpoint was not sharded"
    assert all(".fp16" in path.name for path in directory.glob("*/*.safetensors")), "only fp16 files were written"
    settings = Settings(models_dir=directory.parent, variant="fp16")
    stages = {stage: load_stage_model(name, stage, settings) for stage in STAGES}
    [image] = generate(stages, [SPEC.model_copy(update={"model": name})])
    stock = load_stock(directory, variant="fp16", dtype=torch.float32)
    family = model_family(directory)
    expected = np.array(family.stock_call(stock, SPEC).images[0])
    np.testing.assert_array_equal(image, expected)
    sizes = weight_bytes(name, settings)
    for stage in STAGES:
        files = [path for part in family.stage_components[stage] for path in (directory / part).glob("*.fp16*.safetensors")]
        assert sizes[stage] == sum(path.stat().st_size for path in files)
    assert sizes["denoise"] > 0 and sizes["decode"] > 0


@pytest.mark.parametrize("model", PRESETS)
def test_each_stage_holds_only_its_own_components(stages, stock_pipeline, tiny_models_dir: Path, model: str) -> None:
    family, stock = stock_pipeline(model)
    assert isinstance(family, DiffusersFamily)
    directory = model_directory(model, Settings(models_dir=tiny_models_dir))

    def parameters(module: object) -> list[torch.nn.Parameter]:
        return list(module.parameters()) if isinstance(module, torch.nn.Module) else []

    everything = 0
    for name, stage in stages(model).items():
        assert isinstance(stage, DiffusersStage)
        own = family.stage_components[name]
        assert stage.loaded_components() == sorted(own)
        assert all(module is None for key, module in stage.pipe.components.items() if key not in own)
        resident = [p for module in stage.pipe.components.values() for p in parameters(module)]
        assert sum(p.numel() for p in resident) == sum(p.numel() for key in own for p in parameters(stock.components[key]))
        everything += sum(p.numel() for p in resident)
        # Resident fp32 parameters are the stage's weight files, less their headers and
        # buffers; nothing of another stage's size is loaded.
        resident_bytes, on_disk = sum(p.numel() * p.element_size() for p in resident), family.weight_bytes(directory)[name]
        assert 0.9 * on_disk < resident_bytes <= on_disk, (name, resident_bytes, on_disk)
    assert everything == sum(p.numel() for module in stock.components.values() for p in parameters(module)) > 0


@pytest.mark.parametrize("guidance", [4.5, 1.0])
@pytest.mark.parametrize("size", [0, 1], ids=["square", "oblong"])
@pytest.mark.parametrize("model", PRESETS)
def test_split_run_is_pixel_identical_to_the_stock_pipeline(stages, stock_image, model: str, size: int, guidance: float) -> None:
    height, width = SIZES[model][size]
    spec = job(model, height=height, width=width, guidance=guidance)
    for stage in stages(model).values():
        stage.check(spec)  # the size fits the family's geometry
    assert_stock_image(stages(model), spec, stock_image(spec))


@pytest.mark.parametrize("model", PRESETS)
def test_seed_prompt_negative_and_guidance_each_change_the_image(stages, model: str) -> None:
    base = job(model, prompt="a red cat", negative_prompt="", seed=3)
    [reference] = generate(stages(model), [base])
    for change in [{"seed": 4}, {"prompt": "a blue dog"}, {"negative_prompt": "blurry"}, {"guidance": 1.0}]:
        [changed] = generate(stages(model), [base.model_copy(update=change)])
        assert not np.array_equal(changed, reference), change


@pytest.mark.parametrize("model", PRESETS)
def test_encoder_hands_on_exactly_the_declared_tensors(stages, model: str) -> None:
    declared = set(stages(model)["encode"].family.handoff["encode"])
    specs = [job(model, prompt="short", guidance=1.0), job(model, prompt="a longer prompt " * 10, guidance=4.5)]
    unguided, guided = stages(model)["encode"].run(specs, [{}, {}])
    assert set(unguided) == {name for name in declared if not name.startswith("negative_")}
    assert set(guided) == declared
    for tensors in (unguided, guided):
        assert all(t.shape[0] == 1 for t in tensors.values())


@pytest.mark.parametrize("model", PRESETS)
def test_encoder_batch_mixing_guidance_matches_each_alone(stages, model: str) -> None:
    specs = [job(model, prompt="a cat", guidance=1.0), job(model, prompt="a long prompt about dogs", negative_prompt="ugly", guidance=4.5)]
    encoder = stages(model)["encode"]
    for spec, together in zip(specs, encoder.run(specs, [{}, {}])):
        [alone] = encoder.run([spec], [{}])
        assert together.keys() == alone.keys()
        for name in alone:
            torch.testing.assert_close(together[name], alone[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("model", PRESETS)
def test_denoiser_reports_every_step(stages, model: str) -> None:
    spec = job(model, steps=4)
    encoded = stages(model)["encode"].run([spec], [{}])
    steps: list[tuple[int, int]] = []
    [latents] = stages(model)["denoise"].run([spec], encoded, lambda k, n: steps.append((k, n)))
    assert steps == [(k, 4) for k in range(1, 5)]
    assert set(latents) == set(stages(model)["denoise"].family.handoff["denoise"]) and latents["latents"].shape[0] == 1


@pytest.mark.parametrize("field", ["frames", "height", "width"])
@pytest.mark.parametrize("model", PRESETS)
def test_check_names_the_field(stages, tiny_models_dir: Path, model: str, field: str) -> None:
    multiple = stages(model)["encode"].geometry.size_multiple
    value = {"frames": 2, "height": 64 + multiple // 2, "width": 64 + multiple // 2}[field]
    spec = job(model).model_copy(update={field: value})
    assert_refused(stages(model), spec, field, Settings(models_dir=tiny_models_dir))


@pytest.mark.parametrize("guidance", [4.5, 1.0])
@pytest.mark.parametrize("model", PRESETS)
def test_batched_jobs_match_running_each_alone(stages, model: str, guidance: float) -> None:
    """Batched matmuls (and, for Qwen-Image, padding under a mask) round differently from each
    job alone: latents within ``LATENT_ATOL``, pixels within 1/255 in float32."""
    height, width = SIZES[model][1]
    specs = [
        job(model, prompt=prompt, negative_prompt=negative, seed=seed, height=height, width=width, guidance=guidance)
        for prompt, negative, seed in [("a cat", "", 1), ("two dogs on a beach at noon, seen from far away", "ugly", 2), ("x", "dark", 3)]
    ]
    encoded = [handoff(t) for t in stages(model)["encode"].run(specs, [{} for _ in specs])]
    denoiser = stages(model)["denoise"]
    for spec, together, inputs in zip(specs, denoiser.run(specs, encoded), encoded):
        [alone] = denoiser.run([spec], [inputs])
        torch.testing.assert_close(together["latents"], alone["latents"], rtol=0, atol=LATENT_ATOL[model])
    assert_batch_like_each_alone(stages(model), specs, f"{model}, guidance {guidance}")


@pytest.mark.parametrize("model", PRESETS)
def test_preset_is_the_same_bytes_when_built_again(tiny_models_dir: Path, tmp_path: Path, model: str) -> None:
    def file_bytes(root: Path) -> dict[str, bytes]:
        return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}

    session_copy = model_directory(model, Settings(models_dir=tiny_models_dir))
    assert file_bytes(init_preset(model, tmp_path / model)) == file_bytes(session_copy)
