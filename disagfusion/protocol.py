"""Every message that crosses NATS: pydantic models, subject names and the msgpack codec.

Messages are msgpack maps validated by these models; ``v`` carries the schema version so a
worker can refuse what it does not understand instead of guessing. Tensors never travel here
as Python objects: a stage output is a set of ``TensorRef`` (see ``disagfusion.transport``).
docs/protocol.md describes the same thing for clients in other languages.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from disagfusion.transport.ref import TensorRef

SCHEMA_VERSION = 1

STAGES = ("encode", "denoise", "decode")
"""Stage names in pipeline order; the services running them are encoder, dit and decoder."""

SERVICE_OF_STAGE = {"encode": "encoder", "denoise": "dit", "decode": "decoder"}

WORK_STREAM = "DF_WORK"
RESULTS_STREAM = "DF_RESULTS"
OUTPUTS_BUCKET = "DF_OUTPUTS"
HANDBACKS_BUCKET = "DF_HANDBACKS"

# Model names become one NATS subject token, so they may not contain dots, spaces or wildcards.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def work_subject(stage: str, model: str) -> str:
    return f"df.work.{stage}.{model}"


def results_subject(job_id: str) -> str:
    return f"df.results.{job_id}"


def events_subject(job_id: str) -> str:
    return f"df.events.{job_id}"


def metrics_subject(stage: str) -> str:
    return f"df.metrics.{stage}"


def next_stage(stage: str) -> str | None:
    i = STAGES.index(stage)
    return STAGES[i + 1] if i + 1 < len(STAGES) else None


def new_job_id() -> str:
    return uuid.uuid4().hex


class Message(BaseModel):
    """Base of every wire message: strict about unknown fields, versioned."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    v: int = SCHEMA_VERSION

    @field_validator("v")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"schema version {v} is not supported (this build speaks {SCHEMA_VERSION})")
        return v


class JobSpec(Message):
    """What a user asks for. Model-specific limits (e.g. size divisible by the latent factor)
    are checked by the stage that loads the model, which answers with an error result."""

    job_id: str = Field(default_factory=new_job_id)
    model: str = "tiny"
    prompt: str
    negative_prompt: str = ""
    seed: int = Field(default=0, ge=0, lt=2**63)
    steps: int = Field(default=20, ge=1, le=1000)
    height: int = Field(default=256, ge=8, le=8192)
    width: int = Field(default=256, ge=8, le=8192)
    frames: int = Field(default=1, ge=1, le=1024)
    guidance: float = Field(default=4.5, ge=0.0, le=100.0)

    @field_validator("job_id", "model")
    @classmethod
    def _subject_token(cls, value: str) -> str:
        if not _TOKEN.match(value):
            raise ValueError("must be 1-64 characters of letters, digits, '_' or '-'")
        return value

    @property
    def shape_key(self) -> tuple[str, int, int, int, int, float]:
        """Jobs with the same key can share a DiT or decoder batch."""
        return (self.model, self.height, self.width, self.frames, self.steps, self.guidance)

    def cost_key(self, stage: str) -> tuple:
        """Jobs with the same key take about as long at ``stage``: one shape, and at the encoder
        prompts of one length (in powers of two, so keys stay few)."""
        return (*self.shape_key, len(self.prompt).bit_length() if stage == "encode" else 0)


class StageTask(Message):
    """A unit of work on ``df.work.<stage>.<model>``: the job plus the previous stage's output."""

    job: JobSpec
    stage: Literal["encode", "denoise", "decode"]
    tensors: dict[str, TensorRef] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds of compute per stage so far (stage name → seconds), carried to the result."""
    submitted_at: float = Field(default_factory=time.time)


class Result(Message):
    """The one answer a job gets, on ``df.results.<job_id>``; failures are results too."""

    job_id: str
    status: Literal["ok", "error"]
    error: str | None = None
    field: str | None = None
    """For a rejected spec: the offending field, so a client can point at it."""
    stage: str | None = None
    content_type: str | None = None
    data: bytes | None = None
    """Output bytes (PNG) when small enough to travel inline."""
    object_name: str | None = None
    """Else the name of the output in the DF_OUTPUTS object store bucket."""
    width: int | None = None
    height: int | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    submitted_at: float | None = None
    finished_at: float = Field(default_factory=time.time)


class ProgressEvent(Message):
    """Best-effort progress on ``df.events.<job_id>`` (core NATS, not persisted)."""

    job_id: str
    kind: Literal["stage_started", "step", "stage_done", "done", "error"]
    stage: str | None = None
    step: int | None = None
    total: int | None = None
    t: float = Field(default_factory=time.time)


class TimingSample(Message):
    """One measured stage execution on ``df.metrics.<stage>``, food for the scheduler's predictor."""

    stage: str
    model: str
    worker: str
    batch: int
    seconds: float
    jobs: list[JobSpec]
    t: float = Field(default_factory=time.time)


M = TypeVar("M", bound=Message)


def pack(message: Message) -> bytes:
    return msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)


class DecodeError(ValueError):
    """A message that is not valid msgpack or does not fit its model. ``job_id`` is set when it
    could still be read, so the worker can answer the job with an error result."""

    def __init__(self, message: str, job_id: str | None = None, field: str | None = None):
        super().__init__(message)
        self.job_id = job_id
        self.field = field


def unpack(model: type[M], data: bytes) -> M:
    try:
        raw: Any = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise DecodeError(f"message is not valid msgpack: {exc}") from exc
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise DecodeError(
            f"invalid {model.__name__}: {field or 'message'}: {first['msg']}",
            job_id=_find_job_id(raw),
            field=field,
        ) from exc


def _find_job_id(raw: Any) -> str | None:
    """Best effort: the job id of a message that failed validation, if it has a usable one."""
    if not isinstance(raw, dict):
        return None
    candidate = raw.get("job_id")
    if candidate is None and isinstance(raw.get("job"), dict):
        candidate = raw["job"].get("job_id")
    if isinstance(candidate, str) and _TOKEN.match(candidate):
        return candidate
    return None

