"""Thumbnails: small WebPs of a job's image, never larger than the image."""

from __future__ import annotations

import io

from PIL import Image

from services.gateway.thumbnails import THUMBNAIL_PX, thumbnail


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def test_a_large_image_shrinks_to_fit_keeping_its_aspect() -> None:
    with Image.open(io.BytesIO(thumbnail(png(600, 300)))) as small:
        assert small.format == "WEBP" and small.size == (THUMBNAIL_PX, THUMBNAIL_PX // 2)


def test_a_small_image_keeps_its_size() -> None:
    with Image.open(io.BytesIO(thumbnail(png(64, 48)))) as small:
        assert small.size == (64, 48)
