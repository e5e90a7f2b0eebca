"""Every name and message that crosses NATS: stages, subjects, streams and buckets, message ids,
pydantic message models, the errors a message can carry, and the msgpack codec.

Messages are msgpack maps validated by these models; ``v`` carries the schema version so a
worker can refuse what it does not understand instead of guessing. Tensors never travel here
as Python objects: a stage output is a set of ``TensorRef`` (see ``disagfusion.transport``).
docs/protocol.md describes the same thing for clients in other languages.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from disagfusion.errors import DisagFusionError

SCHEMA_VERSION = 1

# --------------------------------------------------------------------- stages


class Stage(StrEnum):
    """The three stages of every job, in pipeline order. A member is its wire name."""

    ENCODE = "encode"
    DENOISE = "denoise"
    DECODE = "decode"

    # Printed as the plain name it is on the wire: a dict keyed by stages reads {'encode': 3}.
    __repr__ = str.__repr__

    @property
    def service(self) -> str:
        """The service that runs this stage (its compose service and ``services/`` package)."""
        return _SERVICES[self]

    @property
    def next(self) -> Stage | None:
        """The stage this one hands its output to; None after the last."""
        following = STAGES.index(self) + 1
        return STAGES[following] if following < len(STAGES) else None

    @property
    def is_last(self) -> bool:
        return self.next is None

    @classmethod
    def of_service(cls, service: str) -> Stage | None:
        """The stage ``service`` runs, or None for a service that runs none (the scheduler)."""
        return next((stage for stage, name in _SERVICES.items() if name == service), None)


STAGES: tuple[Stage, ...] = tuple(Stage)
"""Stage names in pipeline order; the services running them are encoder, dit and decoder."""
_SERVICES = {Stage.ENCODE: "encoder", Stage.DENOISE: "dit", Stage.DECODE: "decoder"}
STAGE_SERVICES: tuple[str, ...] = tuple(_SERVICES.values())

# --------------------------------------------------------------------- names on the bus

WORK_STREAM = "DF_WORK"
RESULTS_STREAM = "DF_RESULTS"
OUTPUTS_BUCKET = "DF_OUTPUTS"
HANDBACKS_BUCKET = "DF_HANDBACKS"
ATTEMPTS_BUCKET = "DF_ATTEMPTS"
DLQ_STREAM = "DF_DLQ"
SCHEDULER_BUCKET = "DF_SCHEDULER"
SCHEDULER_STATUS_KEY = "status"
SCHEDULER_PINS_KEY = "pins"
ENGRAM_ARENAS_BUCKET = "DF_ENGRAM_ARENAS"
CHECKPOINTS_BUCKET = "DF_CHECKPOINTS"
ENGRAM_QUEUE_GROUP = "engram_store"
JOBS_BUCKET = "DF_JOBS"

# Model names and job ids become one NATS subject token, so they may not contain dots, spaces or wildcards.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A tenant's job ids are qualified with its name, ``<tenant>.<id>``: two tokens, so that NATS
# permissions can give each tenant its own ``df.results.<tenant>.*`` (docs/protocol.md "Tenants").
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64})?$")


def is_token(value: str) -> bool:
    """Whether ``value`` can be a model name: one subject token, no wildcards."""
    return bool(_TOKEN.match(value))


def is_job_id(value: str) -> bool:
    """Whether ``value`` can be a job id: ``<id>``, or ``<tenant>.<id>`` for a tenant's job."""
    return bool(_JOB_ID.match(value))


def tenant_of(job_id: str) -> str | None:
    """The tenant whose namespace a job id is in; None for a job of the shared namespace."""
    tenant, dot, _ = job_id.partition(".")
    return tenant if dot else None


def qualified(job_id: str, tenant: str) -> str:
    """``job_id`` in ``tenant``'s namespace (as is if it already is)."""
    return job_id if tenant_of(job_id) == tenant else f"{tenant}.{job_id}"


def work_subject(stage: str, model: str, tenant: str | None = None) -> str:
    """Where a stage's tasks wait. A tenant submits on ``df.work.encode.<model>.<tenant>``, the
    only work subject its NATS user may publish to; every other task, a tenant's later stages
    included, on ``df.work.<stage>.<model>``."""
    return f"df.work.{stage}.{model}" + (f".{tenant}" if tenant else "")


def results_subject(job_id: str) -> str:
    return f"df.results.{job_id}"


def events_subject(job_id: str) -> str:
    return f"df.events.{job_id}"


def cancel_subject(job_id: str) -> str:
    """Core NATS request subject on which a stage answers a cancelled job (``job_state.cancel``)."""
    return f"df.cancel.{job_id}"


def metrics_subject(stage: str) -> str:
    return f"df.metrics.{stage}"


def dlq_subject(stage: str, model: str) -> str:
    """Where a dead-lettered task of ``stage`` for ``model`` is kept, in ``DF_DLQ``."""
    return f"df.dlq.{stage}.{model}"


def ipc_release_subject(producer: str) -> str:
    """Where a CUDA IPC producer hears that a consumer is done with one of its tensors."""
    return f"df.ipc.release.{producer}"


DOMAINS_SUBJECT = "df.domains"
"""Where every stage worker says, every few seconds, which shm domain it serves its stage from
(``DomainAd``), so producers know whether the next stage can map their shm files."""


def blob_subject(domain: str) -> str:
    """Where the workers of one shm domain serve its shm tensors to consumers elsewhere (``BlobRequest``)."""
    return f"df.blob.{domain}"


def engram_lookup_subject(arena: str) -> str:
    """One subject per arena: services on one NATS may serve arenas with the same table names
    (every arena built from a spec has ``compression``), and a lookup must reach a service
    holding the arena the client read the descriptor of."""
    return f"df.engram.lookup.{arena}"


def _replayed(msg_id: str, replay: int) -> str:
    """A message id of the ``replay``-th run of a job from the dead-letter stream: the failed
    run's ids are remembered for the duplicate window, and the replay's must not match them."""
    return f"{msg_id}:replay{replay}" if replay else msg_id


def task_msg_id(job_id: str, stage: str, replay: int = 0) -> str:
    """``Nats-Msg-Id`` of a job's task for ``stage``: a replayed publish is stored once."""
    return _replayed(f"{job_id}:{stage}", replay)


def result_msg_id(job_id: str, replay: int = 0) -> str:
    """``Nats-Msg-Id`` of a job's result: one result per job (per replay), whoever publishes it."""
    return _replayed(f"{job_id}:result", replay)


def attempt_key(job_id: str, stage: str) -> str:
    """Key in ``DF_ATTEMPTS``: which worker took the latest delivery of this task, and when."""
    return f"{job_id}.{stage}"


def consumer_name(stage: str, model: str) -> str:
    """One durable pull consumer per (stage, model), shared by every instance of the stage."""
    return f"{stage}-{model}"


def parse_consumer_name(name: str) -> tuple[Stage, str] | None:
    """(stage, model) of a stage's consumer from its name; None for any other consumer."""
    stage, _, model = name.partition("-")
    return (Stage(stage), model) if stage in STAGES and model else None


def unserved_consumer_name(stage: str, model: str) -> str:
    """The short-lived consumer an encoder uses to answer tasks for a model nobody serves."""
    return f"unserved-{stage}-{model}"


def handback_key(job_id: str, stage: str) -> str:
    """Key in ``DF_HANDBACKS``: how often a worker handed this task back without failing it (a
    drain, or a retry after Redis or NATS was briefly away)."""
    return f"{job_id}.{stage}"


def job_state_key(job_id: str) -> str:
    """Key in ``DF_JOBS`` of a job's ``JobState``. A job id is one subject token (letters,
    digits, ``_``, ``-``), all of them legal in a KV key, so it is the key's second token as is."""
    return f"state.{job_id}"


def spec_key(job_id: str) -> str:
    """Key in ``DF_JOBS`` holding the digest of the spec first submitted under a job id: the same
    spec again is a retry, another spec under the same id is refused (``job_state.claim``)."""
    return f"spec.{job_id}"


def cancel_key(job_id: str) -> str:
    """Key in ``DF_JOBS`` whose presence cancels the job (its value: the ``JobState`` the canceller wrote)."""
    return f"cancel.{job_id}"


def checkpoint_key(job_id: str, replay: int = 0) -> str:
    """Key in ``DF_CHECKPOINTS``: the latest checkpoint of a job's denoising run (per replay:
    a job replayed from the dead-letter stream starts afresh)."""
    return f"{job_id}.{replay}"


def tensor_key(job_id: str, stage: str, name: str) -> str:
    """The producer's name of one output tensor of a stage, part of its ``TensorRef.key``."""
    return f"{job_id}.{stage}.{name}"


def output_object_name(job_id: str, extension: str) -> str:
    """A large output's object name in ``DF_OUTPUTS``."""
    return f"{job_id}.{extension}"


def new_job_id() -> str:
    return uuid.uuid4().hex


def job_id_of_msg_id(msg_id: str | None) -> str | None:
    """The job id a ``Nats-Msg-Id`` names (``<job_id>:<stage>[:replay<n>]``), so a task whose body
    cannot be read is still answered; None if the header is missing or names no valid job id."""
    job_id = (msg_id or "").partition(":")[0]
    return job_id if is_job_id(job_id) else None


def _work_subject_tokens(subject: str) -> list[str]:
    """``[stage, model]`` or ``[stage, model, tenant]`` of a work subject; [] for any other subject."""
    parts = subject.split(".")
    return parts[2:] if len(parts) in (4, 5) and parts[:2] == ["df", "work"] else []


def parse_work_subject(subject: str) -> tuple[str, str] | None:
    """(stage, model) of a ``df.work.<stage>.<model>[.<tenant>]`` subject; None for any other subject."""
    tokens = _work_subject_tokens(subject)
    return (tokens[0], tokens[1]) if tokens else None


def tenant_inbox(tenant: str) -> str:
    """Where a connection's replies come (publish acks, JetStream answers, cancel answers): a
    tenant's own ``_INBOX.t-<tenant>``, the one inbox its NATS user may subscribe to (a NUID, the
    second token of every other inbox, has no ``-``, so the two never meet); else ``_INBOX``."""
    return f"_INBOX.t-{tenant}" if tenant else "_INBOX"


def subject_tenant(subject: str) -> str | None:
    """The tenant a work subject was published under (its fifth token); None for the shared namespace."""
    tokens = _work_subject_tokens(subject)
    return tokens[2] if len(tokens) == 3 else None


def outputs_bucket_name(job_id: str) -> str:
    """The object store bucket of a job's large output: a tenant's own (``DF_OUTPUTS_<tenant>``,
    which only it may read), else ``DF_OUTPUTS``. An object store's subjects encode the object
    name, so one shared bucket could not be split per tenant by NATS permissions."""
    tenant = tenant_of(job_id)
    return f"{OUTPUTS_BUCKET}_{tenant}" if tenant else OUTPUTS_BUCKET


# --------------------------------------------------------------------- messages


class Strict(BaseModel):
    """Unknown fields are errors, and a value once received is not changed."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(Strict):
    """Base of every wire message: strict about unknown fields, versioned."""

    v: int = SCHEMA_VERSION

    @field_validator("v")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"schema version {v} is not supported (this build speaks {SCHEMA_VERSION})")
        return v


OutputFormat = Literal["png", "webp", "mp4"]


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
    """Classifier-free guidance scale: above 1 the DiT also runs on the negative prompt (true
    CFG for FLUX.1 and Qwen-Image)."""
    embedded_guidance: float = Field(default=3.5, ge=0.0, le=100.0)
    """Guidance fed to a guidance-distilled transformer (FLUX.1-dev); other models ignore it."""
    fps: float | None = Field(default=None, gt=0.0, le=240.0)
    """Frames per second of a video's output; None: the model's own (16 unless it says)."""
    output_format: OutputFormat | None = None
    """The result's encoding: ``png`` (a video: a zip of PNG frames), ``webp`` (lossless;
    animated for a video) or ``mp4`` (H.264). None: png for an image, mp4 for a video."""
    deadline_s: float | None = Field(default=None, gt=0)
    """Seconds after submission by which the job must be done, else it ends with an error
    result; None: the deployment's default (``DF_JOB_DEADLINE_S``, also the longest allowed)."""

    @field_validator("model")
    @classmethod
    def _subject_token(cls, value: str) -> str:
        if not _TOKEN.match(value):
            raise ValueError("must be 1-64 characters of letters, digits, '_' or '-'")
        return value

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, value: str) -> str:
        if not _JOB_ID.match(value):
            raise ValueError("must be 1-64 characters of letters, digits, '_' or '-', "
                             "qualified as '<tenant>.<id>' for a tenant's job")
        return value

    @property
    def shape_key(self) -> tuple[str, int, int, int, int, float, float]:
        """Jobs with the same key can share a DiT or decoder batch."""
        return (self.model, self.height, self.width, self.frames, self.steps, self.guidance, self.embedded_guidance)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on: the DiT runs twice per step and the negative prompt
        is encoded too."""
        return self.guidance > 1.0

    @property
    def output_encoding(self) -> OutputFormat:
        """``output_format``, or the default for this job: png for an image, mp4 for a video."""
        return self.output_format or ("mp4" if self.frames > 1 else "png")

    @property
    def megapixel_frames(self) -> float:
        """The size of the output, in millions of pixels times frames."""
        return self.height * self.width * self.frames / 1e6


TransportName = Literal["inline", "shm", "redis", "cuda_ipc"]

TENSOR_ITEMSIZES: dict[str, int] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}
"""Bytes per element of every dtype a ``TensorRef`` may name (numpy names, plus bfloat16)."""


class TensorRef(Strict):
    """One stored tensor, as the next stage's task names it (inside a versioned ``StageTask``).
    The bytes are the tensor's memory in C order; ``dtype`` is a numpy name or ``bfloat16``.

    A ref that cannot describe a tensor (an unknown dtype, a shape that does not hold
    ``nbytes``) fails validation, so its task is answered as undecodable when it arrives
    instead of failing deep inside the worker that rebuilds the tensor."""

    transport: TransportName
    key: str
    dtype: str
    shape: list[Annotated[int, Field(ge=0)]]
    nbytes: int = Field(ge=0)
    checksum: str
    """xxh3-64 of the raw bytes, hex, where the bytes leave the host's memory (inline, redis);
    empty for shm and cuda_ipc, whose bytes stay in one host's (or device's) memory."""
    data: bytes | None = None
    """The bytes themselves, for the inline transport only."""
    domain: str | None = None
    """The shm domain (``disagfusion.transport.locality``) an shm or cuda_ipc ref was written in:
    a consumer in another domain cannot map it and asks that domain for the bytes. None for the
    other transports, and in refs from producers that predate domains (read as local)."""

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in TENSOR_ITEMSIZES:
            raise ValueError(f"unknown dtype {value!r} (known: {', '.join(TENSOR_ITEMSIZES)})")
        return value

    @model_validator(mode="after")
    def _shape_holds_nbytes(self) -> TensorRef:
        expected = math.prod(self.shape) * TENSOR_ITEMSIZES[self.dtype]
        if expected != self.nbytes:
            raise ValueError(
                f"tensor {self.key!r}: shape {self.shape} of {self.dtype} is {expected} bytes, not nbytes={self.nbytes}"
            )
        if self.data is not None and len(self.data) != self.nbytes:
            raise ValueError(f"tensor {self.key!r}: {len(self.data)} inline bytes, not nbytes={self.nbytes}")
        return self


class StageTask(Message):
    """A unit of work on ``df.work.<stage>.<model>``: the job plus the previous stage's output."""

    job: JobSpec
    stage: Literal["encode", "denoise", "decode"]
    tensors: dict[str, TensorRef] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds of compute per job per stage so far (stage name → seconds: a batch's time over
    its jobs), carried to the result."""
    batch_sizes: dict[str, int] = Field(default_factory=dict)
    """Jobs in the batch each stage so far ran this job in."""
    submitted_at: float = Field(default_factory=time.time)
    replay: int = Field(default=0, ge=0)
    """How often this job was run again: replayed by an operator from the dead-letter stream
    (``disagfusion dlq replay``) or sent back to its first stage because an input vanished
    (``disagfusion.worker.replay``); part of its message ids (``task_msg_id``), carried to the
    following stages."""
    input_replays: int = Field(default=0, ge=0)
    """How often this job was sent back to its first stage because an input vanished (bounded
    by ``max_input_replays``); carried to the following stages."""

    def handed_on(self, tensors: dict[str, TensorRef], seconds: float, batch_size: int) -> StageTask:
        """The next stage's task: this stage's outputs, and its time and batch size added."""
        stage = Stage(self.stage)
        if stage.is_last:
            raise ValueError(f"stage {self.stage} is the last: its output is the job's result")
        timings, batch_sizes = self.with_stage(seconds, batch_size)
        return StageTask(job=self.job, stage=stage.next, tensors=tensors, timings=timings, batch_sizes=batch_sizes,
                         submitted_at=self.submitted_at, replay=self.replay,
                         input_replays=self.input_replays)

    def with_stage(self, seconds: float, batch_size: int) -> tuple[dict[str, float], dict[str, int]]:
        """``timings`` and ``batch_sizes`` with this stage's own added."""
        return {**self.timings, self.stage: seconds}, {**self.batch_sizes, self.stage: batch_size}


class Result(Message):
    """The one answer a job gets, on ``df.results.<job_id>``; failures are results too."""

    job_id: str
    status: Literal["ok", "error", "cancelled"]
    error: str | None = None
    field: str | None = None
    """For a rejected spec: the offending field, so a client can point at it."""
    stage: str | None = None
    content_type: str | None = None
    data: bytes | None = None
    """Output bytes (PNG, WebP) when small enough to travel inline."""
    object_name: str | None = None
    """Else the name of the output in the DF_OUTPUTS object store bucket."""
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    """For a video: how many frames the output holds."""
    fps: float | None = None
    """For a video: its frame rate."""
    duration_s: float | None = None
    """For a video: how long it plays, ``frames / fps``."""
    timings: dict[str, float] = Field(default_factory=dict)
    batch_sizes: dict[str, int] = Field(default_factory=dict)
    submitted_at: float | None = None
    finished_at: float = Field(default_factory=time.time)

    @classmethod
    def ok(cls, task: StageTask, seconds: float, batch_size: int, **output: Any) -> Result:
        """The result of a job whose last stage, ``task``, took ``seconds`` in a batch of
        ``batch_size``; ``output`` holds the output fields (content_type, data or object_name, ...)."""
        timings, batch_sizes = task.with_stage(seconds, batch_size)
        return cls(job_id=task.job.job_id, status="ok", stage=task.stage, timings=timings, batch_sizes=batch_sizes,
                   submitted_at=task.submitted_at, **output)

    @classmethod
    def failed(cls, job_id: str, error: str, stage: str, field: str | None = None) -> Result:
        """A job that cannot be done: ``error`` says why in words a person can act on."""
        return cls(job_id=job_id, status="error", error=error, field=field, stage=stage)

    @classmethod
    def cancelled(cls, job_id: str, stage: str | None, by: str) -> Result:
        """A job dropped because it was cancelled (``stage``: where, None if no stage had it)."""
        return cls(job_id=job_id, status="cancelled", error=f"cancelled by {by}", stage=stage)


ProgressKind = Literal["stage_started", "step", "stage_done", "done", "error", "resumed", "replayed"]
"""``resumed``: a denoising run continues from a checkpoint (``step`` of ``total``) after the
instance that ran it was killed or drained; ``replayed``: an input of the stage vanished and the
job runs again from its first stage."""


class ProgressEvent(Message):
    """Best-effort progress on ``df.events.<job_id>`` (core NATS, not persisted)."""

    job_id: str
    kind: ProgressKind
    stage: str | None = None
    step: int | None = None
    total: int | None = None
    t: float = Field(default_factory=time.time)


JobStatus = Literal["queued", "running", "done", "error", "cancelled"]


class JobState(Message):
    """A job's state under ``job_state_key`` in ``DF_JOBS`` (and a cancel mark under
    ``cancel_key``), so a client that comes late can ask. Best effort: the result is the truth."""

    job_id: str
    state: JobStatus
    stage: str | None = None
    """The stage running it (``running``), or where it ended (``error``, ``cancelled``)."""
    step: int | None = None
    total: int | None = None
    """Denoising steps done and to do, while denoising."""
    by: str | None = None
    """Who wrote it: a worker's name, or a client (``gateway``, ``cli``)."""
    t: float = Field(default_factory=time.time)


class Attempt(Message):
    """Who took the latest delivery of a task, under ``attempt_key`` in ``DF_ATTEMPTS``: when a
    task runs out of deliveries, what the last one ended in is the cause its error result gives."""

    worker: str
    delivery: int
    t: float = Field(default_factory=time.time)
    error: str | None = None
    """How the delivery failed, when the worker lived to say (else it never answered)."""


class DeadLetter(Message):
    """A task given up for a reason other than a user's error, on ``df.dlq.<stage>.<model>`` in
    ``DF_DLQ``: the task as it was delivered, and why it was given up. ``disagfusion dlq replay``
    publishes ``task`` again."""

    job_id: str | None
    """None for a message so broken that its job id could not be read."""
    stage: str
    model: str | None
    subject: str
    """Where the task was consumed from, and where a replay publishes it."""
    reason: str
    deliveries: int
    worker: str
    task: bytes
    """The task message's bytes, as delivered."""
    t: float = Field(default_factory=time.time)


class Checkpoint(Message):
    """Where a job's denoising run stood after ``step`` of its ``total`` steps, under
    ``checkpoint_key`` in ``DF_CHECKPOINTS``: the latents and scheduler state
    (``disagfusion.models.resume``), stored through the tensor transport. Deleted, with its
    tensors, once the job's latents are handed on."""

    job: JobSpec
    """The job as checkpointed: a task whose spec differs does not resume from it."""
    step: int = Field(ge=1)
    total: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    """The jobs its batch held: a run resumes bitwise equal to an uninterrupted one when it
    resumes in a batch of the same jobs (one, in particular)."""
    tensors: dict[str, TensorRef]
    worker: str
    t: float = Field(default_factory=time.time)


class DomainAd(Message):
    """A stage worker's shm domain, on ``df.domains`` every few seconds while it serves (and
    once with ``leaving`` when it stops): producers hand a stage's consumers tensors through
    shm only while all of them share the producer's domain, else through Redis."""

    worker: str
    stage: Literal["encode", "denoise", "decode"]
    models: list[str]
    domain: str
    leaving: bool = False


class BlobRequest(Message):
    """On ``df.blob.<domain>`` (request/reply): a consumer outside the domain of ``ref`` asks for
    ``size`` bytes of it from ``offset`` (chunks under NATS's max payload), or, with ``delete``,
    frees it. Any worker of the domain answers with a ``BlobChunk``."""

    ref: TensorRef
    offset: int = Field(default=0, ge=0)
    size: int = Field(default=0, ge=0)
    delete: bool = False


class BlobChunk(Message):
    """The answer to a ``BlobRequest``: the bytes asked for, or why there are none."""

    data: bytes = b""
    checksum: str = ""
    """xxh3-64 of ``data``, hex: the bytes crossed hosts."""
    error: str | None = None


class SampledJob(Strict):
    """What the cost model reads of one job (``disagfusion.cost.JobWork``), and its id: a timing
    sample carries this instead of the job's spec, so anyone allowed to read ``df.metrics``
    learns the shape of the work and never a prompt."""

    job_id: str
    model: str
    guided: bool
    steps: int
    tokens: int
    """Prompt tokens, plus the negative prompt's when guided."""
    megapixel_frames: float


class TimingSample(Message):
    """One measured stage execution on ``df.metrics.<stage>``, food for the scheduler's predictor."""

    stage: str
    model: str
    worker: str
    batch: int
    seconds: float
    jobs: list[SampledJob]
    t: float = Field(default_factory=time.time)


class IpcRelease(Message):
    """A consumer is done with a CUDA IPC tensor: on ``df.ipc.release.<producer>``."""

    key: str
    """The tensor's name in the producer's registry."""


class StageState(Message):
    """The scheduler's view of one stage, part of ``SchedulerStatus``."""

    stage: str
    service: str
    desired: int
    running: int
    backlog: int
    """Tasks queued or held by a worker (num_pending + num_ack_pending)."""
    in_flight: int
    waiting: int
    """Idle pull requests."""
    arrival_rate: float
    """Jobs per second entering the stage (smoothed)."""
    throughput: float
    """Jobs per second the stage finished (smoothed)."""
    predicted_s: float | None = None
    """Predicted seconds per job on the reference device, for the jobs measured."""
    measured_s: float | None = None
    predictor_error: float | None = None
    """Running mean of |predicted - measured| / measured over the stage's models."""
    pinned: bool = False


class SchedulerStatus(Message):
    """What the elastic scheduler publishes about itself each tick: JSON under key ``status``
    of the KV bucket ``DF_SCHEDULER``."""

    t: float = Field(default_factory=time.time)
    policy: str
    actuator: str
    pool: str
    tick_s: float
    stages: list[StageState]
    pins: dict[str, int] = Field(default_factory=dict)
    """Replicas per service an operator fixed (``disagfusion scale``), until released."""
    results: int = 0
    """Results seen in the latency window."""
    throughput: float = 0.0
    """Results per second over the latency window."""
    p50_s: float | None = None
    p95_s: float | None = None
    """End-to-end latency (submitted to finished) of the results in the window."""
    last_error: str | None = None
    """The last actuator failure, if the last apply failed."""

    def fresh(self, now: float | None = None) -> bool:
        """Whether a scheduler published this recently enough to be running."""
        return (now or time.time()) - self.t < max(30.0, 3 * self.tick_s)


# --------------------------------------------------------------------- errors a message can carry


class DecodeError(DisagFusionError, ValueError):
    """A message that is not valid msgpack or does not fit its model. ``job_id`` is set when it
    could still be read, so the worker can answer the job with an error result."""

    def __init__(self, message: str, job_id: str | None = None, field: str | None = None):
        super().__init__(message)
        self.job_id = job_id
        self.field = field


class MissingBlobError(DisagFusionError, LookupError):
    """The tensor a ``TensorRef`` points to is gone (expired, deleted or never written here)."""


class ChecksumError(DisagFusionError, RuntimeError):
    """The bytes a transport returned for a ``TensorRef`` are not the bytes that were stored."""


# --------------------------------------------------------------------- codec

M = TypeVar("M", bound=Message)


def pack(message: Message) -> bytes:
    return msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)


_WIRE_REQUIRED: dict[str, tuple[str, ...]] = {"StageTask": ("v", "job.v", "job.job_id")}
"""Fields a message must carry on the wire although the Python model has a default: the schema
version always (a message without one cannot be told from one of a future version), and a
submitted job's id (a job whose id a stage made up could never be found by its client)."""


def unpack(model: type[M], data: bytes) -> M:
    """Decode one message strictly: a msgpack map whose values have exactly the field's type (no
    string-to-number or float-to-int conversion), every required field present. A failure is a
    ``DecodeError`` in the protocol's words, with the job id when it can be read."""
    try:
        raw: Any = msgpack.unpackb(data, raw=False)
    except UnicodeDecodeError as exc:
        raise DecodeError(f"message is not valid msgpack: a str is not valid UTF-8 ({exc.reason})") from exc
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise DecodeError(f"message is not valid msgpack: {exc}") from exc
    if not isinstance(raw, dict):
        raise DecodeError(f"invalid {model.__name__}: the message must be a msgpack map, not {_wire_type(raw)}")
    for path in _WIRE_REQUIRED.get(model.__name__, ("v",)):
        if not _has(raw, path):
            raise DecodeError(f"invalid {model.__name__}: {path}: is required", job_id=_find_job_id(raw), field=path)
    try:
        return model.model_validate(raw, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise DecodeError(
            f"invalid {model.__name__}: {field or 'message'}: {_in_protocol_terms(first)}",
            job_id=_find_job_id(raw),
            field=field,
        ) from exc


def _has(raw: dict, path: str) -> bool:
    """Whether the dotted ``path`` is present (a part that is not a map is checked later, by type)."""
    head, _, rest = path.partition(".")
    if head not in raw:
        return False
    return not rest or not isinstance(raw[head], dict) or _has(raw[head], rest)


_WIRE_TYPES = {dict: "a map", list: "an array", str: "a str", bytes: "bin", bool: "a bool", int: "an int",
               float: "a float", type(None): "nil"}

_PROTOCOL_WORDS = {
    "int_type": "must be an int", "int_from_float": "must be an int", "float_type": "must be a float or int",
    "string_type": "must be a str", "bytes_type": "must be bin", "bool_type": "must be a bool",
    "dict_type": "must be a map", "model_type": "must be a map", "model_attributes_type": "must be a map",
    "list_type": "must be an array", "missing": "is required", "extra_forbidden": "is not a field of this message",
}


def _wire_type(value: object) -> str:
    return _WIRE_TYPES.get(type(value), type(value).__name__)


def _in_protocol_terms(error: Any) -> str:
    """A validation error in msgpack's words (map, array, str, int), not Python's (dict, list)."""
    words = _PROTOCOL_WORDS.get(error["type"])
    if words is None:
        return str(error["msg"]).removeprefix("Value error, ").replace("Input should be", "must be")
    if error["type"] in ("missing", "extra_forbidden"):
        return words
    return f"{words}, not {_wire_type(error.get('input'))}"


def _find_job_id(raw: Any) -> str | None:
    """Best effort: the job id of a message that failed validation, if it has a usable one."""
    if not isinstance(raw, dict):
        return None
    candidate = raw.get("job_id")
    if candidate is None and isinstance(raw.get("job"), dict):
        candidate = raw["job"].get("job_id")
    if isinstance(candidate, str) and _JOB_ID.match(candidate):
        return candidate
    return None
