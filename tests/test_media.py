"""The output encodings of a result (disagfusion.media): the lossless ones give every pixel back, the MP4 decodes to
the right frames, size and rate, and stays close to them."""

from __future__ import annotations

import io
import zipfile

import av
import numpy as np
import pytest
from PIL import Image

from disagfusion.media import encode


def moving_gradient(frames: int, height: int, width: int) -> np.ndarray:
    """A smooth picture that moves, as a video model's output does."""
    y, x = np.mgrid[0:height, 0:width]
    video = [np.stack([(x * 4 + t * 8) % 256, (y * 4 + t * 3) % 256, (x + y + t * 5) % 256], axis=-1) for t in range(frames)]
    return np.asarray(video, dtype=np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def mp4_frames(data: bytes) -> tuple[np.ndarray, float]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return frames, float(stream.average_rate)


@pytest.mark.parametrize("fps", [8.0, 16.0, 24.0])
def test_mp4_has_every_frame_at_the_rate_and_size(fps: float) -> None:
    video = moving_gradient(17, 48, 80)
    encoded = encode(video, "mp4", fps)
    assert (encoded.content_type, encoded.extension) == ("video/mp4", "mp4")
    frames, rate = mp4_frames(encoded.data)
    assert frames.shape == video.shape and rate == fps
    quality = psnr(frames, video)
    print(f"H.264 yuv420p crf 17, smooth moving gradient: PSNR {quality:.1f} dB")
    assert quality > 35  # measured 41-42 dB here; yuv420p halves the colour resolution


def test_mp4_of_noise_is_still_the_right_length() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    frames, _ = mp4_frames(encode(noise, "mp4", 16.0).data)
    assert frames.shape == noise.shape
    print(f"H.264 of uniform noise (the worst case, as tiny random models make): PSNR {psnr(frames, noise):.1f} dB")


def test_lossless_forms_give_every_pixel_back() -> None:
    video = moving_gradient(5, 32, 64)
    webp = Image.open(io.BytesIO(encode(video, "webp", 16.0).data))
    frames = []
    for index in range(webp.n_frames):
        webp.seek(index)
        frames.append(np.asarray(webp.convert("RGB")))
    np.testing.assert_array_equal(np.stack(frames), video)
    archive = encode(video, "png", 16.0)
    assert archive.content_type == "application/zip"
    with zipfile.ZipFile(io.BytesIO(archive.data)) as files:
        np.testing.assert_array_equal(np.stack([np.asarray(Image.open(files.open(n))) for n in files.namelist()]), video)


def test_an_image_is_a_png_or_a_still_webp() -> None:
    image = moving_gradient(1, 32, 32)
    png = encode(image, "png", 16.0)
    assert png.content_type == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png.data))), image[0])
    webp = encode(image, "webp", 16.0)
    assert webp.content_type == "image/webp"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(webp.data)).convert("RGB")), image[0])
