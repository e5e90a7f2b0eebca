"""What every diffusers video family shares, checked on each family's tiny preset: the split
stages make the stock pipeline's frames bit for bit (float32 and bfloat16), each stage holds only
its own components, the encoder hands on what the family declares, batching does not change a
job's frames beyond a measured bound, and specs are checked field by field. What only one family
does is tested in its own module (test_wan.py, test_ltx.py, test_cogvideox.py,
test_hunyuan_video.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from disagfusion.config import Settings
from disagfusion.models import init_preset, model_directory
from disagfusion.protocol import JobSpec
from tests.models.split import assert_refused, frames, generate_video, handoff

PRESETS = ["wan-tiny", "ltx-tiny", "cogvideox-tiny", "hunyuan-video-tiny"]
"""One preset per diffusers video family."""

FRAMES = {"wan-tiny": 5, "ltx-tiny": 5, "cogvideox-tiny": 9, "hunyuan-video-tiny": 5}
"""A job's frames unless a test says otherwise: the shortest that fits each geometry past one
(Wan, LTX, HunyuanVideo 4k + 1; CogVideoX 8k + 1)."""

GUIDANCE = {"wan-tiny": 5.0, "ltx-tiny": 5.0, "cogvideox-tiny": 6.0, "hunyuan-video-tiny": 4.5}
"""The classifier-free guidance scale a guided job uses, each family's usual one."""

SHAPES = {
    "wan-tiny": [(32, 32, 5, 1.0), (32, 32, 5, 5.0), (32, 48, 9, 1.0), (48, 32, 9, 5.0)],
    "ltx-tiny": [(32, 32, 5, 1.0), (32, 32, 5, 5.0), (32, 64, 9, 1.0), (64, 32, 9, 5.0)],
    "cogvideox-tiny": [(32, 32, 9, 1.0), (32, 32, 9, 6.0), (32, 48, 17, 1.0), (48, 32, 9, 6.0)],
    "hunyuan-video-tiny": [(32, 32, 5, 1.0), (32, 32, 5, 4.5), (32, 48, 9, 1.0), (48, 32, 9, 4.5)],
}
"""(height, width, frames, guidance): one square shape with and without guidance, then two
oblong ones, longer, one unguided and one guided. Sizes are multiples of each geometry's
``size_multiple`` (LTX 32, the others 16)."""

OBLONG = {"wan-tiny": 48, "ltx-tiny": 64, "cogvideox-tiny": 48, "hunyuan-video-tiny": 48}
"""A width other than the square 32 that fits each geometry."""

BFLOAT16_FRAMES = {"wan-tiny": 9, "ltx-tiny": 9, "cogvideox-tiny": 9, "hunyuan-video-tiny": 5}
"""Frames of the guided oblong bfloat16 job."""

TEXT_LENGTH = {"wan-tiny": 512, "ltx-tiny": 128, "cogvideox-tiny": 226, "hunyuan-video-tiny": 256}
"""Tokens of prompt embedding the encoder hands on, padded or truncated to: the stock call's
default (UMT5 512, T5 128, CogVideoX's max_text_seq_length 226, Llama 256)."""

DENOISED = {
    "wan-tiny": ({"steps": 3, "frames": 9, "width": 48}, (1, 16, 3, 4, 6)),
    "ltx-tiny": ({"steps": 3, "frames": 9, "width": 64}, (1, 3 * 8 * 16, 8)),
    "cogvideox-tiny": ({"steps": 3, "frames": 17, "width": 48}, (1, 5, 16, 4, 6)),
    "hunyuan-video-tiny": ({"steps": 3, "frames": 9, "width": 48}, (1, 16, 3, 4, 6)),
}
"""A 3-step job and the latents the denoiser hands on for it: Wan and HunyuanVideo channels
first (16 channels, (9 - 1) / 4 + 1 latent frames, 4×6 latent pixels), CogVideoX frames first
((17 - 1) / 4 + 1 latent frames), LTX packed ((9 - 1) / 4 + 1 latent frames of 8×16 latent pixels,
1×1×1 patches of 8 channels)."""

BAD_FIELDS = {
    "wan-tiny": [({"frames": 4}, "frames"), ({"frames": 7}, "frames"), ({"height": 24}, "height"), ({"width": 36}, "width")],
    "ltx-tiny": [({"frames": 4}, "frames"), ({"frames": 7}, "frames"), ({"height": 48}, "height"), ({"width": 16}, "width")],
    "cogvideox-tiny": [({"frames": 5}, "frames"), ({"frames": 8}, "frames"), ({"height": 24}, "height"), ({"width": 36}, "width")],
    "hunyuan-video-tiny": [({"frames": 4}, "frames"), ({"frames": 7}, "frames"), ({"height": 40}, "height"), ({"width": 24}, "width")],
}
"""Per preset, specs its geometry refuses and the field each names: frames off the temporal rule,
a height and a width off the size multiple."""

LATENT_BOUND = {
    ("wan-tiny", True): 4e-6, ("wan-tiny", False): 1e-6,
    ("ltx-tiny", True): 4e-6, ("ltx-tiny", False): 1e-6,
    ("cogvideox-tiny", True): 5e-6, ("cogvideox-tiny", False): 5e-6,
    ("hunyuan-video-tiny", True): 5e-6, ("hunyuan-video-tiny", False): 5e-6,
}
"""How far a batched job's latents may be from its latents alone, (preset, guided). Measured with
2 jobs of one shape (float32, one thread, the preset's FRAMES of 32×32): Wan guided 2.9e-6,
unguided 4.8e-7; LTX 2.3e-6 and 4.8e-7; CogVideoX 3.8e-6 and 4.2e-7; HunyuanVideo 1.9e-6 and
6e-7 (batched matmuls round differently)."""

FRAME_BOUND = {"wan-tiny": 0, "ltx-tiny": 1, "cogvideox-tiny": 1, "hunyuan-video-tiny": 1}
"""How far (in 1/255) a batched job's frames may be from its frames alone: Wan's are equal; the
others within 1/255 (LTX's decoder decodes job by job; CogVideoX unguided equal, guided 1/255)."""


def job(model: str, **update) -> JobSpec:
    base = JobSpec(model=model, prompt="A lighthouse at dusk, waves rolling in", negative_prompt="blurry", seed=7,
                   steps=2, height=32, width=32, frames=FRAMES[model], guidance=1.0)
    if model == "hunyuan-video-tiny":
        base = base.model_copy(update={"embedded_guidance": 6.0})
    return base.model_copy(update=update)


@pytest.mark.parametrize("shape", range(4), ids=["square", "square-guided", "oblong", "tall-guided"])
@pytest.mark.parametrize("model", PRESETS)
def test_split_run_is_pixel_identical_to_the_stock_pipeline(stages, stock_frames, model: str, shape: int) -> None:
    height, width, count, guidance = SHAPES[model][shape]
    spec = job(model, height=height, width=width, frames=count, guidance=guidance)
    [out] = generate_video(stages(model), [spec])
    assert out["video"].dtype == np.uint8 and out["video"].shape == (count, height, width, 3)
    np.testing.assert_array_equal(out["video"], stock_frames(spec))
    np.testing.assert_array_equal(out["image"], out["video"][0])


@pytest.mark.parametrize("model", PRESETS)
def test_bfloat16_split_run_is_pixel_identical_to_the_stock_pipeline(stages, stock_frames, model: str) -> None:
    spec = job(model, width=OBLONG[model], frames=BFLOAT16_FRAMES[model], guidance=GUIDANCE[model])
    np.testing.assert_array_equal(frames(stages(model, "bfloat16"), spec), stock_frames(spec, "bfloat16"))


@pytest.mark.parametrize("model", PRESETS)
def test_negative_prompt_counts_only_with_guidance(stages, model: str) -> None:
    unguided, other = (frames(stages(model), job(model, negative_prompt=n)) for n in ("blurry", "dark"))
    np.testing.assert_array_equal(unguided, other)
    guided, guided_other = (frames(stages(model), job(model, guidance=GUIDANCE[model], negative_prompt=n)) for n in ("blurry", "dark"))
    assert not np.array_equal(guided, guided_other)


@pytest.mark.parametrize("model", PRESETS)
def test_each_stage_holds_only_its_own_components(stages, stock_pipeline, model: str) -> None:
    family, stock = stock_pipeline(model)
    reference = stock.components
    for name, stage in stages(model).items():
        own = family.stage_components[name]
        assert stage.loaded_components() == sorted(own)
        assert all(module is None for key, module in stage.pipe.components.items() if key not in own)
        modules = [module for module in stage.pipe.components.values() if isinstance(module, torch.nn.Module)]
        resident = sum(p.numel() for module in modules for p in module.parameters())
        expected = sum(p.numel() for key in own if isinstance(reference[key], torch.nn.Module) for p in reference[key].parameters())
        assert resident == expected > 0


@pytest.mark.parametrize("model", PRESETS)
def test_encoder_hands_on_exactly_the_declared_tensors(stages, model: str) -> None:
    encoder = stages(model)["encode"]
    declared = set(encoder.family.handoff["encode"])
    specs = [job(model, prompt="short"), job(model, prompt="a longer prompt " * 200, guidance=GUIDANCE[model]),
             job(model, prompt="x", guidance=2.0)]
    unguided, guided, guided_too = encoder.run(specs, [{}, {}, {}])
    assert set(unguided) == {name for name in declared if not name.startswith("negative_")}
    assert set(guided) == set(guided_too) == declared
    for tensors in (unguided, guided, guided_too):
        assert all(t.shape[0] == 1 for t in tensors.values())
    # Long prompts truncated, short ones padded, to the family's text length.
    assert guided["prompt_embeds"].shape == guided["negative_prompt_embeds"].shape == (1, TEXT_LENGTH[model], 32)


@pytest.mark.parametrize("model", PRESETS)
def test_encoder_batch_mixing_guidance_matches_each_alone(stages, model: str) -> None:
    specs = [job(model, prompt="a cat"), job(model, prompt="dogs", negative_prompt="ugly", guidance=GUIDANCE[model])]
    encoder = stages(model)["encode"]
    for spec, together in zip(specs, encoder.run(specs, [{}, {}])):
        [alone] = encoder.run([spec], [{}])
        assert together.keys() == alone.keys()
        for name in alone:
            torch.testing.assert_close(together[name], alone[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("model", PRESETS)
def test_denoiser_reports_every_step_and_hands_on_the_declared_latents(stages, model: str) -> None:
    update, shape = DENOISED[model]
    spec = job(model, **update)
    encoded = stages(model)["encode"].run([spec], [{}])
    steps: list[tuple[int, int]] = []
    [latents] = stages(model)["denoise"].run([spec], encoded, lambda k, n: steps.append((k, n)))
    assert steps == [(k, 3) for k in range(1, 4)]
    assert set(latents) == set(stages(model)["denoise"].family.handoff["denoise"]) == {"latents"}
    assert latents["latents"].shape == shape


@pytest.mark.parametrize("case", range(4), ids=["frames", "frames-again", "height", "width"])
@pytest.mark.parametrize("model", PRESETS)
def test_check_names_the_field(stages, tiny_models_dir: Path, model: str, case: int) -> None:
    update, field = BAD_FIELDS[model][case]
    spec = job(model, **update)
    assert_refused(stages(model), spec, field, Settings(models_dir=tiny_models_dir))


@pytest.mark.parametrize("guided", [True, False], ids=["guided", "unguided"])
@pytest.mark.parametrize("model", PRESETS)
def test_batched_jobs_match_running_each_alone(stages, model: str, guided: bool) -> None:
    """Two jobs of one shape batched against each alone: latents within ``LATENT_BOUND``, frames
    within ``FRAME_BOUND``, and neither job gets the other's video."""
    guidance = GUIDANCE[model] if guided else 1.0
    specs = [
        job(model, prompt=prompt, negative_prompt=negative, seed=seed, guidance=guidance)
        for prompt, negative, seed in [("a cat", "", 1), ("two dogs on a beach at noon", "ugly", 2)]
    ]
    split = stages(model)
    encoded = [handoff(t) for t in split["encode"].run(specs, [{} for _ in specs])]
    together = split["denoise"].run(specs, encoded)
    worst_latent = 0.0
    for spec, latents, inputs in zip(specs, together, encoded):
        [alone] = split["denoise"].run([spec], [inputs])
        worst_latent = max(worst_latent, float((latents["latents"] - alone["latents"]).abs().max()))
    batched = [out["video"] for out in generate_video(split, specs)]
    alone = [frames(split, spec) for spec in specs]
    worst = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(batched, alone))
    print(f"{model}, guidance {guidance}, batched vs alone: latents within {worst_latent:.2g}, frames within {worst}/255")
    assert worst_latent <= LATENT_BOUND[model, guided]
    assert worst <= FRAME_BOUND[model]
    assert not np.array_equal(batched[0], batched[1])  # no job got the other's video


@pytest.mark.parametrize("model", PRESETS)
def test_preset_is_the_same_bytes_when_built_again(tiny_models_dir: Path, tmp_path: Path, model: str) -> None:
    def file_bytes(root: Path) -> dict[str, bytes]:
        return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}

    session_copy = model_directory(model, Settings(models_dir=tiny_models_dir))
    assert file_bytes(init_preset(model, tmp_path / model)) == file_bytes(session_copy)
