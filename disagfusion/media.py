"""The bytes a job's result carries: its pixels encoded in the format the job asked for.

- ``png``: an image as PNG; a video as a zip of one PNG per frame (``00000.png``, ...).
- ``webp``: lossless WebP, animated for a video. PNG and WebP give every pixel back exactly, so
  a client can check outputs bit for bit.
- ``mp4``: H.264 in yuv420p (the form every player takes), encoded with PyAV's bundled FFmpeg.
  Lossy: ``MP4_CRF`` sets how close it stays (the tests measure the PSNR).
"""

from __future__ import annotations

import io
import zipfile
from fractions import Fraction

import av
import numpy as np
from PIL import Image
from pydantic import BaseModel

from disagfusion.protocol import OutputFormat

MP4_CRF = 17
"""x264's constant rate factor: 17 is close to visually lossless (0 would be lossless, but
yuv420p halves the colour resolution anyway)."""


class Encoded(BaseModel):
    data: bytes
    content_type: str
    extension: str


def frame_file_name(index: int) -> str:
    return f"{index:05d}.png"


def encode(frames: np.ndarray, output_format: OutputFormat, fps: float) -> Encoded:
    """``frames`` uint8 [F, H, W, 3] (F = 1 for an image) in ``output_format``."""
    still = frames.shape[0] == 1
    if output_format == "mp4":
        return Encoded(data=encode_mp4(frames, fps), content_type="video/mp4", extension="mp4")
    if output_format == "webp":
        return Encoded(data=encode_webp(frames, fps), content_type="image/webp", extension="webp")
    if still:
        return Encoded(data=encode_png(frames[0]), content_type="image/png", extension="png")
    return Encoded(data=encode_png_zip(frames), content_type="application/zip", extension="zip")


def encode_png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def encode_png_zip(frames: np.ndarray) -> bytes:
    """One PNG per frame in a zip, stored rather than deflated (PNG is compressed already)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for index, frame in enumerate(frames):
            archive.writestr(frame_file_name(index), encode_png(frame))
    return out.getvalue()


def encode_webp(frames: np.ndarray, fps: float) -> bytes:
    """Lossless WebP, animated when there are several frames: every pixel comes back exactly."""
    images = [Image.fromarray(frame) for frame in frames]
    out = io.BytesIO()
    images[0].save(out, format="WEBP", save_all=len(images) > 1, append_images=images[1:], lossless=True,
                   duration=round(1000 / fps), loop=0)
    return out.getvalue()


def encode_mp4(frames: np.ndarray, fps: float) -> bytes:
    """H.264 (yuv420p) in an MP4 container. yuv420p needs even sides: an odd one (no model here
    makes one) is padded by repeating its last row or column."""
    height, width = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(MP4_CRF)}
        for frame in frames:
            padded = np.pad(frame, ((0, height - frame.shape[0]), (0, width - frame.shape[1]), (0, 0)), mode="edge")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return out.getvalue()
