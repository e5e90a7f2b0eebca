"""The request bodies the gateway takes, and the JobSpecs they become.

OpenAI's fields keep their names; the project's own settings of a job come as the extensions
SGLang's diffusion server also takes (``negative_prompt``, ``num_inference_steps``,
``guidance_scale``, ``seed``). A field left out takes JobSpec's default, so a request and
``disagfusion generate`` with the same values make the same pixels.
"""

from __future__ import annotations

import json
import math
from typing import Literal, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from disagfusion.protocol import JobSpec
from services.gateway.errors import ApiError, invalid

IGNORED = ("quality", "style", "user", "background", "moderation", "output_compression", "stream", "partial_images")
"""OpenAI parameters that have no meaning here; accepted and ignored so SDK calls that set them work."""

DEFAULT_FPS = 16.0
"""The frame rate ``seconds`` is counted in when a request names neither ``frames`` nor ``fps``:
the models' own default."""


def parse_size(size: str) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` as (width, height)."""
    width, _, height = size.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise ValueError(f"must look like 256x256 (WIDTHxHEIGHT), got {size!r}")
    return int(width), int(height)


class JobRequest(BaseModel):
    """What an image and a video request share."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str = JobSpec.model_fields["model"].default
    size: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    deadline_s: float | None = None
    """Seconds after submission by which each job must be done (``JobSpec.deadline_s``)."""

    @field_validator("size")
    @classmethod
    def _size(cls, size: str | None) -> str | None:
        if size is not None:
            parse_size(size)
        return size

    def spec_fields(self) -> dict[str, object]:
        """The JobSpec fields this request sets (the rest keep JobSpec's defaults)."""
        fields: dict[str, object] = {"model": self.model, "prompt": self.prompt}
        if self.size is not None:
            fields["width"], fields["height"] = parse_size(self.size)
        named = {"negative_prompt": self.negative_prompt, "steps": self.num_inference_steps,
                 "guidance": self.guidance_scale, "seed": self.seed, "deadline_s": self.deadline_s}
        return {**fields, **{key: value for key, value in named.items() if value is not None}}


class ImageRequest(JobRequest):
    """``POST /v1/images/generations``."""

    n: int = Field(default=1, ge=1, le=10)
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "webp"] = "png"
    # OpenAI parameters with no meaning here (see IGNORED): accepted, unused.
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = None
    stream: bool | None = None
    partial_images: int | None = None

    @field_validator("stream")
    @classmethod
    def _not_streamed(cls, stream: bool | None) -> bool | None:
        if stream:
            raise ValueError("streaming is not supported")
        return stream

    def job_specs(self) -> list[JobSpec]:
        """One job per image, seeds ``seed .. seed + n - 1`` (raises pydantic's ValidationError)."""
        first = JobSpec(**self.spec_fields(), output_format=self.output_format)
        return [first] + [first.model_copy(update={"seed": first.seed + i, "job_id": f"{first.job_id}-{i}"})
                          for i in range(1, self.n)]


class VideoRequest(JobRequest):
    """``POST /v1/videos`` (JSON or multipart form, as OpenAI's SDK sends it). ``frames`` wins
    over ``seconds``; ``seconds`` at ``fps`` (default 16) makes ``seconds * fps + 1`` frames, the
    ``4k + 1`` that Wan-style VAEs take."""

    seconds: float | None = Field(default=None, gt=0)
    frames: int | None = None
    fps: float | None = None
    input_reference: None = None  # image-to-video is not served

    def job_spec(self) -> JobSpec:
        frames = self.frames
        if frames is None and self.seconds is not None:
            frames = math.ceil(self.seconds * (self.fps or DEFAULT_FPS)) + 1
        extra = {"frames": frames} if frames is not None else {}
        return JobSpec(**self.spec_fields(), **extra, fps=self.fps, output_format="mp4")


M = TypeVar("M", bound=BaseModel)


async def read_request(request: Request, model: type[M]) -> M:
    """The body as ``model``: JSON, or a form (OpenAI's SDK posts videos as multipart)."""
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            fields: object = dict((await request.form()).items())
        else:
            fields = json.loads(await request.body() or b"null")
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON or form data: {exc}", code="invalid_body") from exc
    if not isinstance(fields, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_body")
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise invalid(exc) from exc
