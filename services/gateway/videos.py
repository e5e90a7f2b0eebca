"""OpenAI's asynchronous videos API: ``POST /v1/videos`` queues a job and answers at once;
``GET /v1/videos/{id}`` tells its status and progress; ``GET /v1/videos/{id}/content`` gives
the MP4 once it is done; ``DELETE /v1/videos/{id}`` cancels it."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from disagfusion.protocol import JobSpec, JobState, Result
from services.gateway.errors import invalid, spec_param
from services.gateway.jobs import JobRecord, cancel, find, job_view, output
from services.gateway.schemas import VideoRequest, read_request

router = APIRouter()


def video_object(job_id: str, record: JobRecord | None, result: Result | None, state: JobState | None = None) -> dict:
    """OpenAI's ``Video`` object for what is known of a job. A cancelled video is ``failed``
    with the error code ``cancelled``: OpenAI's statuses have no other word for it."""
    view = job_view(job_id, record, result, "", state)
    spec: JobSpec | None = record.spec if record else None
    width = result.width if result and result.width else spec.width if spec else None
    height = result.height if result and result.height else spec.height if spec else None
    seconds = (result.duration_s if result and result.duration_s
               else spec.frames / (spec.fps or 16.0) if spec else None)
    error = None
    if result is not None and result.status != "ok":
        code = "cancelled" if result.status == "cancelled" else spec_param(result.field) or "job_failed"
        error = {"code": code, "message": result.error or "failed"}
    return {
        "id": job_id,
        "object": "video",
        "model": spec.model if spec else None,
        "prompt": spec.prompt if spec else None,
        "status": "failed" if view["status"] == "cancelled" else view["status"],
        "progress": view["progress"],
        "created_at": record.created_at if record else int(result.submitted_at or result.finished_at),
        "completed_at": int(result.finished_at) if result else None,
        "size": f"{width}x{height}" if width and height else None,
        "seconds": None if seconds is None else f"{seconds:g}",
        "error": error,
    }


@router.post("/v1/videos")
async def create_video(request: Request) -> dict:
    body = await read_request(request, VideoRequest)
    try:
        spec = body.job_spec()
    except ValidationError as exc:
        raise invalid(exc) from exc
    state = request.app.state
    client = await state.backend.admit([spec])
    record = state.jobs.add(spec)
    await state.jobs.follow(client, record)  # before submitting: no event is missed
    await client.submit(spec)
    return video_object(spec.job_id, record, None)


@router.get("/v1/videos/{video_id}")
async def retrieve_video(request: Request, video_id: str) -> dict:
    record, result, state = await find(request, video_id)
    if result is not None:
        await request.app.state.jobs.settled(video_id)
    return video_object(video_id, record, result, state)


@router.delete("/v1/videos/{video_id}")
async def delete_video(request: Request, video_id: str) -> dict:
    """Cancel the video: OpenAI's ``VideoDeleteResponse``. Its output is never made, so there
    is nothing else to delete; a video that finished first is a 409."""
    await cancel(request, video_id)
    return {"id": video_id, "object": "video.deleted", "deleted": True}


@router.get("/v1/videos/{video_id}/content")
async def download_video(request: Request, video_id: str) -> Response:
    result, data = await output(request, video_id)
    return Response(data, media_type=result.content_type)
