"""``GET /v1/jobs/{id}/thumbnail``: a finished image job's output shrunk to a small WebP, for the
dashboard's list of recent jobs (a full image per row would be megabytes at real sizes)."""

from __future__ import annotations

import asyncio
import io

from fastapi import APIRouter, Request, Response
from PIL import Image

from services.gateway.errors import ApiError
from services.gateway.jobs import output

THUMBNAIL_PX = 128
"""The longer side at most; smaller outputs keep their size."""

router = APIRouter()


def thumbnail(image: bytes) -> bytes:
    with Image.open(io.BytesIO(image)) as picture:
        picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        out = io.BytesIO()
        picture.save(out, format="WEBP", quality=80)
    return out.getvalue()


@router.get("/v1/jobs/{job_id}/thumbnail")
async def get_thumbnail(request: Request, job_id: str) -> Response:
    result, data = await output(request, job_id)
    if not (result.content_type or "").startswith("image/"):
        raise ApiError(404, f"job {job_id} made {result.content_type}, not an image: it has no thumbnail",
                       param="id", code="no_thumbnail")
    # A job's output never changes: the browser may keep the thumbnail.
    return Response(await asyncio.to_thread(thumbnail, data), media_type="image/webp",
                    headers={"Cache-Control": "private, max-age=86400, immutable"})
