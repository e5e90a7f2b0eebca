"""``POST /v1/images/generations``: OpenAI's images API. ``n`` images are ``n`` jobs with seeds
``seed .. seed + n - 1``, published together so the stages can batch them."""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Request
from pydantic import ValidationError

from disagfusion.client import JobTimeout
from services.gateway.errors import ApiError, failed_job, invalid
from services.gateway.schemas import ImageRequest, read_request

router = APIRouter()


@router.post("/v1/images/generations")
async def generate_images(request: Request) -> dict:
    body = await read_request(request, ImageRequest)
    try:
        specs = body.job_specs()
    except ValidationError as exc:
        raise invalid(exc) from exc
    state = request.app.state
    client = await state.backend.admit(specs)
    for spec in specs:
        state.jobs.add(spec)
    try:
        results = {r.job_id: r async for r in client.run_many(specs, timeout=state.settings.gateway_timeout_s)}
    except JobTimeout as exc:
        raise ApiError(504, str(exc), code="timeout") from exc
    finally:
        for spec in specs:
            state.jobs.forget(spec.job_id)  # their results answer from now on
    failed = [results[spec.job_id] for spec in specs if results[spec.job_id].status != "ok"]
    if failed:
        raise failed_job(failed[0])
    data = []
    for spec in specs:
        if body.response_format == "url":
            data.append({"url": f"{request.base_url}v1/jobs/{spec.job_id}/content"})
        else:
            data.append({"b64_json": base64.b64encode(await client.output(results[spec.job_id])).decode()})
    return {"created": int(time.time()), "data": data, "output_format": body.output_format,
            "size": f"{specs[0].width}x{specs[0].height}"}
