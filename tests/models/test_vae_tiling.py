"""``vae_tiling`` (DF_VAE_TILING): the decoder decodes in overlapping tiles through each VAE's own
tiling, which bounds its memory on large frames. A frame no larger than a tile decodes exactly as
without tiling; a larger one stays within a measured distance of the untiled decode, on every
family's tiny preset (random weights: each tile's GroupNorm statistics differ from the whole
frame's, so seams are far more visible than with a trained VAE)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from disagfusion.config import Settings
from disagfusion.models import load_stage_model
from disagfusion.models.base import SpecError
from disagfusion.protocol import JobSpec
from tests.models.split import handoff

TILE = {"sana-tiny": 64, "ltx-tiny": 64}
"""Tile edge per preset, 32 pixels unless named here: the smallest a quarter overlap allows."""

FRAMES = {"wan-tiny": 5, "ltx-tiny": 5, "cogvideox-tiny": 9, "hunyuan-video-tiny": 5}

PSNR_FLOOR = {
    "tiny": 29.0, "sd3-tiny": 14.0, "flux-tiny": 14.0, "sana-tiny": 39.0, "qwen-image-tiny": 27.5,
    "wan-tiny": 23.5, "ltx-tiny": 28.0, "cogvideox-tiny": 34.0, "hunyuan-video-tiny": 15.0,
}
"""The least PSNR (dB) of a tiled decode of 2×2 tiles against the untiled one, per preset: the
measured figure (float32, one thread: PixArt 30.5, SD3 15.6, FLUX 15.5, Sana 40.5, Qwen-Image
29.2, Wan 25.2, LTX 29.4, CogVideoX 35.9, HunyuanVideo 16.3) less about 1.5 dB."""


def decoded(models_dir: Path, spec: JobSpec, **tiling) -> np.ndarray:
    """The frames [F, H, W, 3] (an image as one frame) the decoder makes for ``spec``'s latents."""
    settings = Settings(models_dir=models_dir)
    latents = handoff(load_stage_model(spec.model, "denoise", settings).run(
        [spec], [handoff(load_stage_model(spec.model, "encode", settings).run([spec], [{}])[0])])[0])
    decoder = load_stage_model(spec.model, "decode", Settings(models_dir=models_dir, **tiling))
    [out] = decoder.run([spec], [latents])
    return out["video"].numpy() if "video" in out else out["image"].numpy()[None]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(float) - b.astype(float)) ** 2).mean())
    return 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("model", list(PSNR_FLOOR))
def test_tiled_decode_stays_near_the_untiled_one(tiny_models_dir: Path, model: str) -> None:
    tile = TILE.get(model, 32)
    small = JobSpec(model=model, prompt="a lighthouse at dusk", seed=3, steps=2, height=tile, width=tile,
                    frames=FRAMES.get(model, 1), guidance=1.0)
    large = small.model_copy(update={"height": 2 * tile, "width": 2 * tile})
    tiling = {"vae_tiling": True, "vae_tile_size": tile}
    np.testing.assert_array_equal(decoded(tiny_models_dir, small, **tiling), decoded(tiny_models_dir, small))
    tiled, untiled = decoded(tiny_models_dir, large, **tiling), decoded(tiny_models_dir, large)
    assert tiled.shape == untiled.shape == (large.frames, large.height, large.width, 3)
    measured = psnr(tiled, untiled)
    print(f"{model}: tiled ({tile} px tiles) vs untiled at {large.width}x{large.height}: PSNR {measured:.1f} dB")
    assert not np.array_equal(tiled, untiled), "the decoder did not tile"
    assert measured >= PSNR_FLOOR[model]


def test_a_tile_size_off_the_latent_grid_is_refused(tiny_models_dir: Path) -> None:
    with pytest.raises(SpecError, match="vae_tile_size 36"):
        load_stage_model("tiny", "decode", Settings(models_dir=tiny_models_dir, vae_tiling=True, vae_tile_size=36))
