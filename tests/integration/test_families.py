"""Every family through three separate service processes (one stack serving them side by side)
makes the PNG, or the frames, its stock diffusers pipeline makes in-process: same prompt, seed,
size, frames, steps and guidance, not one pixel changed."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from disagfusion.client import Client
from disagfusion.config import Settings
from disagfusion.launcher import Launcher
from disagfusion.models import model_directory
from disagfusion.protocol import JobSpec, Result
from disagfusion_cli import app
from tests.integration.conftest import running_stack

# A stack serving many models: `make test-stacks` runs it, not `make test` (docs in the Makefile).
pytestmark = pytest.mark.stacks

FAMILY_PRESETS = ["sd3-tiny", "flux-tiny", "sana-tiny", "qwen-image-tiny"]
VIDEO_PRESETS = ["wan-tiny", "ltx-tiny", "cogvideox-tiny", "hunyuan-video-tiny"]

CASES = [
    # (width, height, guidance, negative prompt): guided and unguided, square and not
    (64, 64, 4.5, "blurry"),
    (96, 64, 1.0, ""),
]


def specs_for(model: str) -> list[JobSpec]:
    specs = [
        JobSpec(model=model, prompt=f"a lighthouse on a cliff, number {i}", negative_prompt=negative,
                seed=40 + i, steps=3, width=width, height=height, guidance=guidance)
        for i, (width, height, guidance, negative) in enumerate(CASES)
    ]
    if model == "flux-tiny":  # true CFG with the embedded guidance changed too
        specs.append(JobSpec(model=model, prompt="a red boat", negative_prompt="fog", seed=9, steps=3,
                             width=64, height=96, guidance=3.0, embedded_guidance=5.0))
    return specs


@pytest.fixture(scope="module")
def families_stack(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Launcher]:
    """One fp32 stack whose encoder, dit and decoder each serve every family."""
    for name in FAMILY_PRESETS + VIDEO_PRESETS:  # written once here rather than raced for by three services
        model_directory(name, Settings(models_dir=tiny_models_dir))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DF_MODELS", ",".join(FAMILY_PRESETS + VIDEO_PRESETS))
        with running_stack(tmp_path_factory.mktemp("families"), tiny_models_dir) as launcher:
            yield launcher


async def outputs(launcher: Launcher, specs: list[JobSpec]) -> dict[str, Result]:
    got = {}
    async with Client(launcher.client_settings()) as client:
        async for result in client.run_many(specs, timeout=180):
            assert result.status == "ok", f"{result.job_id}: {result.error}"
            got[result.job_id] = result.model_copy(update={"data": await client.output(result)})
    return got


async def images(launcher: Launcher, specs: list[JobSpec]) -> dict[str, np.ndarray]:
    got = await outputs(launcher, specs)
    assert {result.content_type for result in got.values()} == {"image/png"}
    return {job_id: np.asarray(Image.open(io.BytesIO(result.data))) for job_id, result in got.items()}


@pytest.mark.slow
async def test_every_family_is_pixel_identical_to_its_stock_pipeline(families_stack: Launcher, stock_image) -> None:
    specs = [spec for model in FAMILY_PRESETS for spec in specs_for(model)]
    got = await images(families_stack, specs)
    for spec in specs:
        expected = stock_image(spec)
        assert got[spec.job_id].shape == expected.shape == (spec.height, spec.width, 3)
        differ = np.count_nonzero(got[spec.job_id] != expected)
        assert differ == 0, f"{spec.model} {spec.width}x{spec.height} guidance {spec.guidance}: {differ} values differ"


def test_generate_picks_the_model_by_name(families_stack: Launcher, stock_image, tmp_path: Path) -> None:
    out = tmp_path / "boat.png"
    result = CliRunner().invoke(app, ["generate", "a red boat", "--model", "flux-tiny", "-o", str(out), "--steps", "2",
                                      "--size", "64x64", "--guidance", "1", "--seed", "3",
                                      "--data-dir", str(families_stack.data_dir)])
    assert result.exit_code == 0, result.output
    expected = JobSpec(model="flux-tiny", prompt="a red boat", seed=3, steps=2, width=64, height=64, guidance=1.0)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), stock_image(expected))


@pytest.mark.slow
async def test_a_bfloat16_stack_is_pixel_identical_to_the_stock_bfloat16_pipeline(start_stack, stock_image) -> None:
    launcher = start_stack(DF_MODELS="flux-tiny", DF_DTYPE="bfloat16")
    specs = specs_for("flux-tiny")
    got = await images(launcher, specs)
    for spec in specs:
        np.testing.assert_array_equal(got[spec.job_id], stock_image(spec, "bfloat16"))


@pytest.mark.slow
async def test_every_video_family_is_frame_identical_to_its_stock_pipeline(families_stack: Launcher, stock_frames) -> None:
    """Frames as a zip of PNGs (lossless), guided and not, two sizes and frame counts."""
    specs = [
        JobSpec(model=model, prompt=f"waves on a beach, take {i}", negative_prompt="blurry", seed=60 + i, steps=2,
                width=width, height=height, frames=frames, guidance=guidance, output_format="png")
        for model in VIDEO_PRESETS
        for i, (width, height, frames, guidance) in enumerate([(32, 32, 9, 4.5), (64, 32, 17, 1.0)])
    ]
    got = await outputs(families_stack, specs)
    for spec in specs:
        result = got[spec.job_id]
        assert (result.content_type, result.frames) == ("application/zip", spec.frames)
        with zipfile.ZipFile(io.BytesIO(result.data)) as archive:
            frames = np.stack([np.asarray(Image.open(archive.open(name))) for name in archive.namelist()])
        expected = stock_frames(spec)
        assert frames.shape == expected.shape == (spec.frames, spec.height, spec.width, 3)
        differ = np.count_nonzero(frames != expected)
        assert differ == 0, f"{spec.model} {spec.width}x{spec.height}x{spec.frames} guidance {spec.guidance}: {differ} values differ"
