"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so an OpenAI
SDK raises its own exception types (BadRequestError, AuthenticationError, ...) for them."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from disagfusion.limits import LimitError, QueueFull
from disagfusion.protocol import Result

SPEC_PARAMS = {
    "width": "size",
    "height": "size",
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
}
"""JobSpec field (in a validation error or a stage's error result) → the request parameter that
sets it; the other fields have the same name in a request."""

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_exceeded"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    kind = _TYPES.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def spec_param(field: str | None) -> str | None:
    """The request parameter behind a JobSpec field (``job.width`` → ``size``)."""
    if not field:
        return None
    name = field.rsplit(".", 1)[-1]
    return SPEC_PARAMS.get(name, name)


def invalid(exc: ValidationError | RequestValidationError) -> ApiError:
    """A 400 naming the first offending parameter of a request or of the JobSpec built from it."""
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"] if part != "body"]
    param = spec_param(loc[0]) if loc else None
    message = first["msg"] if param is None else f"{param}: {first['msg']}"
    return ApiError(400, message, param, "invalid_value")


async def api_error_handler(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    return invalid(exc).response()


async def http_error_handler(_: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (an unknown path, a wrong method) in the same shape."""
    return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


def failed_job(result: Result) -> ApiError:
    """A job's error result as the answer to its request: a spec a stage refused is the
    request's fault (400, naming its parameter); a cancelled job, a conflict (409); a missed
    deadline, a timeout (504); anything else is ours (500)."""
    if result.status == "cancelled":
        return ApiError(409, f"job {result.job_id} was {result.error}", code="cancelled")
    if result.field == "deadline_s":
        return ApiError(504, f"job {result.job_id}: {result.error}", "deadline_s", "deadline_exceeded")
    if result.field:
        return ApiError(400, result.error or "invalid request", spec_param(result.field), "invalid_value")
    return ApiError(500, f"job {result.job_id} failed at {result.stage}: {result.error}", code="job_failed")


async def limit_error_handler(_: Request, exc: LimitError) -> JSONResponse:
    """A job over a limit (``disagfusion.limits``): the request's fault, naming its parameter."""
    return error_response(400, str(exc), spec_param(exc.field), "limit_exceeded")


async def queue_full_handler(_: Request, exc: QueueFull) -> JSONResponse:
    return error_response(429, str(exc), code="queue_full")
