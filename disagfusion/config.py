"""Settings, read from the environment (``DF_*``) so compose.yaml, the embedded launcher and a
shell all configure a service the same way.

Each group is its own class, so a process reads only what it uses: a client needs the bus; a
stage worker (``Settings``) the bus, the tensor transports, its models and its worker loop.
The engram store and the scheduler own their settings, in their service packages.
"""

from __future__ import annotations

import math
import ssl
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from disagfusion.credentials import check_tenant_format, read_secret, with_credentials


def comma_list(value: object) -> object:
    """Comma-separated text (an environment variable, a command-line flag) as its non-empty,
    stripped items; anything else unchanged. For ``BeforeValidator``s and ``split`` alike."""
    return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value


SHIPPED_PROFILES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "profiles"
"""The cost profiles in the source tree (deploy/profiles/); the image copies them elsewhere."""

_ENV = SettingsConfigDict(env_prefix="DF_", extra="ignore")


def check_tls_files(server: str, cert: Path | None, key: Path | None, ca: Path | None) -> None:
    """A client certificate comes with its key, and every TLS file named exists."""
    if (cert is None) != (key is None):
        name = server.upper()
        raise ValueError(f"DF_{name}_TLS_CERT and DF_{name}_TLS_KEY go together: set both for a client "
                         "certificate, or neither")
    for path in (cert, key, ca):
        if path is not None and not path.is_file():
            raise ValueError(f"{server} TLS file {path} does not exist")


class BusSettings(BaseSettings):
    """How to reach NATS, and what every service that connects to it shares."""

    model_config = _ENV

    nats_url: str = "nats://127.0.0.1:4222"
    """One server, or the comma-separated nodes of a cluster (a client fails over between them);
    ``tls://`` for a server with TLS. May carry credentials (``nats://user:password@host:4222``)."""
    tenant: str = ""
    """Connect as this tenant (docs/security.md "Tenants"): its jobs are ``<tenant>.<id>``, and
    it reads only its own results, events, states and outputs. Its NATS user is the tenant's name
    unless ``nats_user`` says otherwise. Empty: the shared namespace."""
    nats_user: str = ""
    nats_password: str = ""
    nats_password_file: Path | None = None
    """The NATS user of this process's role (docs/security.md), folded into ``nats_url``; the
    password file (a mounted secret) wins over ``nats_password``."""
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    """A client certificate and its key (PEM), for a nats-server that verifies its clients
    (``tls { verify: true }``); both or neither."""
    nats_tls_ca: Path | None = None
    """The CA (PEM) that signed the server's certificate; unset: the system's CA store (and
    ``SSL_CERT_FILE``)."""
    stream_replicas: int = Field(default=1, ge=1, le=5)
    """Copies JetStream keeps of every stream and bucket this creates: 3 on a three-node cluster,
    so a node can die without losing a task or a result (docs/deploy.md). Existing streams keep
    theirs."""
    results_max_age_s: int = Field(default=24 * 3600, ge=1)
    """Results (and their large outputs) are kept this long."""
    dlq_max_age_s: int = Field(default=7 * 24 * 3600, ge=1)
    """Dead-lettered tasks (``DF_DLQ``) are kept this long for ``disagfusion dlq`` to show or replay."""
    heartbeat_s: float = Field(default=5.0, gt=0)
    """How often a service tells JetStream it still works on what it holds, and the container
    runtime that it is alive (at most every 5 s)."""
    max_queue_depth: int = Field(default=10_000, ge=0)
    """A submission (``disagfusion submit``, the Python client, the gateway) is refused while
    this many tasks wait in DF_WORK for the entry stage (queued or being encoded); 0: no limit.
    Keep it well below ``work_max_msgs``: the room between is what accepted jobs need to move
    from stage to stage."""
    work_max_msgs: int = Field(default=100_000, ge=0)
    work_max_bytes: int = Field(default=0, ge=0)
    """At most this many tasks (bytes of tasks) in DF_WORK; 0: no limit. A full DF_WORK refuses
    new publishes (discard policy ``new``): a submission gets a clear error and a stage hands its
    output on later; a task already accepted is never dropped. DF_WORK has no age limit, for the
    same reason. JetStream reserves ``*_max_bytes`` of its storage when the stream is made."""
    results_max_msgs: int = Field(default=1_000_000, ge=0)
    results_max_bytes: int = Field(default=0, ge=0)
    """At most this many results (bytes of results) in DF_RESULTS, besides ``results_max_age_s``;
    0: no limit. When full, the oldest results are dropped first (discard policy ``old``)."""
    outputs_max_bytes: int = Field(default=0, ge=0)
    """At most this many bytes of large outputs in DF_OUTPUTS (kept ``results_max_age_s``); 0:
    no limit. When full, a decoder's output waits and is retried (``retry_delay_s``) until
    older outputs expire: no job's output is dropped."""

    @model_validator(mode="after")
    def _nats_credentials(self) -> BusSettings:
        if self.tenant:
            check_tenant_format(self.tenant)
        password = read_secret(self.nats_password, self.nats_password_file, "the NATS password")
        self.nats_url = with_credentials(self.nats_url, self.nats_user or self.tenant, password, "NATS")
        check_tls_files("NATS", self.nats_tls_cert, self.nats_tls_key, self.nats_tls_ca)
        return self

    def nats_tls(self) -> ssl.SSLContext | None:
        """The TLS context for NATS connections when a client certificate or a CA is set; None:
        nats-py's default (``tls://`` URLs verified against the system's CA store)."""
        if self.nats_tls_cert is None and self.nats_tls_ca is None:
            return None
        context = ssl.create_default_context(cafile=self.nats_tls_ca)
        if self.nats_tls_cert is not None:
            context.load_cert_chain(self.nats_tls_cert, self.nats_tls_key)
        return context


class TransportSettings(BaseSettings):
    """How stage outputs reach the next stage."""

    model_config = _ENV

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_user: str = ""
    redis_password: str = ""
    redis_password_file: Path | None = None
    """The Redis ACL user of the stage role, folded into ``redis_url`` like the NATS user."""
    redis_tls_ca: Path | None = None
    """The CA (PEM) that signed a TLS Redis's certificate (``rediss://`` URLs); unset: the
    system's CA store."""
    redis_tls_cert: Path | None = None
    redis_tls_key: Path | None = None
    """A client certificate and its key (PEM), for a Redis that asks for one
    (``tls-auth-clients yes``); both or neither."""
    transport: Literal["shm", "redis", "cuda_ipc"] = "shm"
    """How stage outputs reach the next stage: shm on one host, redis across hosts, cuda_ipc
    between processes on one GPU (CPU tensors then go through shm)."""
    ipc_lease_s: float = Field(default=300.0, gt=0)
    """A CUDA IPC producer frees a tensor no consumer released after this long."""
    inline_max_bytes: int = Field(default=64 * 1024, ge=0)
    """Tensors smaller than this travel inside the message itself (0: never)."""
    shm_dir: Path = Path("/dev/shm/disagfusion")
    blob_ttl_s: int = Field(default=3600, ge=1)
    """Orphaned tensor blobs (from crashed or abandoned jobs) are removed after this long."""
    handoff_delay_ms: float = Field(default=0.0, ge=0)
    handoff_jitter_ms: float = Field(default=0.0, ge=0)
    """Injected delay per handoff, uniform in delay ± jitter: emulates a slow network in tests
    and benchmarks. Keep both 0 in production."""

    @model_validator(mode="after")
    def _redis_credentials(self) -> TransportSettings:
        # Only stages use Redis, and only with the redis transport: a gateway or a client need
        # no Redis user, so production asks for one only where it is used.
        password = read_secret(self.redis_password, self.redis_password_file, "the Redis password")
        if self.transport == "redis" or password:
            self.redis_url = with_credentials(self.redis_url, self.redis_user, password, "Redis")
        check_tls_files("Redis", self.redis_tls_cert, self.redis_tls_key, self.redis_tls_ca)
        return self

    def redis_tls(self) -> dict[str, str]:
        """redis-py's TLS options for a ``rediss://`` URL (the server is always verified)."""
        files = {"ssl_ca_certs": self.redis_tls_ca, "ssl_certfile": self.redis_tls_cert,
                 "ssl_keyfile": self.redis_tls_key}
        return {option: str(path) for option, path in files.items() if path is not None}


class ModelSettings(BaseSettings):
    """Which models a stage serves, and where and how it runs them."""

    model_config = _ENV

    models_dir: Path = Path.home() / ".cache" / "disagfusion" / "models"
    """Model directories live here, one per model name. The presets (tiny, small) are written
    on first use; a real checkpoint is any diffusers directory placed (or linked) here."""
    profiles_dir: Path = SHIPPED_PROFILES_DIR
    """Cost profiles (``<name>.yaml``, ``disagfusion.cost.CostProfile``): emulated presets are
    written with one of them, the scheduler's predictor starts from them, and ``disagfusion
    profile`` writes a measured one here."""
    models: str = "tiny"
    """Comma-separated model names this worker serves (one durable consumer each)."""
    device: str = "cpu"
    torch_threads: int = Field(default=0, ge=0)
    """CPU threads per worker for torch (0: torch's default, one per core). Several workers on
    one host should share the cores rather than each take all of them."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    variant: str = ""
    """Weight files to load where a checkpoint has several (``fp16`` reads
    ``*.fp16.safetensors``); empty: the plain files."""
    vae_tiling: bool = False
    """Decode in overlapping spatial tiles (the VAE's own ``enable_tiling``): the decoder's memory
    stays bounded for large images and long videos, and the frames differ from an untiled decode
    by the bound docs/models.md states. Off: decoded frames are the stock pipeline's, bit for bit."""
    vae_tile_size: int = Field(default=0, ge=0)
    """Tile edge in pixels when ``vae_tiling`` is on (a multiple of the VAE's scale factor); tiles
    overlap by a quarter. 0: the VAE's own default (256 to 512 pixels, per family)."""
    emulated_speed: float = Field(default=1.0, gt=0)
    """Speed factor of emulated accelerators (model family ``emulated``): 2.0 halves every
    profiled service time, for heterogeneous pools."""

    engram_arena: str = ""
    """Engram layers in the text encoder: off when empty. An arena path maps it in the encoder
    (local mode); ``nats:<arena name>`` reads rows from engram_store over DF_NATS_URL."""
    engram_reply: Literal["shm", "chunks"] = "shm"
    """How engram_store hands rows to a nats: encoder: a shared scratch mapping (same host) or
    1 MiB NATS chunks (any host)."""
    engram_blocks: str = ""
    """``layer:block`` pairs (``0:0,1:2``): which text-encoder block each Engram layer of the
    arena feeds. Empty: Engram layer i feeds block i."""

    @property
    def model_names(self) -> list[str]:
        """``models`` as a list."""
        return comma_list(self.models)


class WorkerSettings(BaseSettings):
    """How a stage worker takes, batches and answers its tasks."""

    model_config = _ENV

    result_inline_max_bytes: int = Field(default=512 * 1024, ge=0)
    """Outputs larger than this go to the DF_OUTPUTS object store instead of the result message."""
    ack_wait_s: float = Field(default=30.0, gt=0)
    """JetStream redelivers a task not acked within this; long stages send in-progress heartbeats."""
    max_deliver: int = Field(default=5, ge=1)
    """After this many deliveries a task gets an error result instead of another try."""
    max_input_replays: int = Field(default=3, ge=0)
    """A job whose input tensors vanished (Redis restarted or evicted them, a blob TTL ran out,
    an shm file went) is run again from its first stage at most this often; then it gets an
    error result saying that its input kept vanishing."""
    pipeline: Literal["async", "sync"] = "async"
    """async overlaps fetch, compute and send across jobs; sync runs one job at a time."""
    prefetch: int = Field(default=2, ge=1)
    """Jobs fetched ahead of the one computing (and outputs queued for sending)."""
    max_in_flight: int = Field(default=4, ge=1)
    """Jobs a worker holds at once, from fetch to ack; raised to 2 x max_batch when smaller."""
    fetch_ahead_s: float = Field(default=1.0, ge=0)
    """A busy worker fetches the next job only once what it has in hand (the rest of the batch
    running and the jobs waiting for it, each timed as the last job of its shape here; a shape
    not run yet counts as endless) will be done within this. Enough to hide a handoff behind
    compute; not so much that a 14 s video job waits behind another while an idle instance
    could start it. ``inf`` fetches up to ``max_in_flight`` at once; 0 fetches only when idle."""
    max_batch: int = Field(default=1, ge=1)
    """Jobs computed together: prompts of one model at the encoder, jobs of one shape
    (model, size, frames, steps, guidance) at dit and decoder. Set per stage service."""
    max_batch_mpx: float = Field(default=math.inf, gt=0)
    """A batch holds at most this many megapixel-frames (``JobSpec.megapixel_frames``) beyond
    its first job, so a batch of large images or videos does not outgrow the device's memory.
    Unlimited by default; the encoder's batches have no pixels."""
    max_batch_wait_ms: float = Field(default=0.0, ge=0)
    """How long a batch waits for more jobs after its first one."""
    retry_delay_s: float = Field(default=1.0, gt=0)
    retry_max_delay_s: float = Field(default=30.0, gt=0)
    """A task that failed because Redis, NATS, memory or disk was briefly unavailable goes back
    to the queue after retry_delay_s, doubled on each further retry up to retry_max_delay_s.
    Such retries do not count against max_deliver: an outage does not fail the jobs."""
    fetch_stall_s: float = Field(default=60.0, gt=0)
    """The health check turns unhealthy when a pull has not come back for this long while the
    worker has room for work and work is queued for it."""
    drain_timeout_s: float = Field(default=60.0, ge=0)
    """On SIGTERM, how long to finish held jobs before handing them back to the queue."""
    worker_name: str = ""
    """Shown in metrics and logs; defaults to host:pid."""

    @property
    def jobs_in_flight(self) -> int:
        """Jobs a stage worker holds at once, from fetch to ack: one with the sync pipeline,
        else ``max_in_flight`` raised to two batches (one computing, one being fetched)."""
        return 1 if self.pipeline == "sync" else max(self.max_in_flight, 2 * self.max_batch)


class MetricsSettings(BaseSettings):
    """Where a service serves its Prometheus metrics (``disagfusion.metrics``, docs/metrics.md)."""

    model_config = _ENV

    metrics_host: str = "127.0.0.1"
    """The address the metrics endpoint binds: 0.0.0.0 in a container, for a scraper outside it."""
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """The first port the endpoint tries; 0: no endpoint."""
    metrics_port_span: int = Field(default=100, ge=1)
    """Ports tried from ``metrics_port`` up: replicas sharing a host each take the first free one."""


class LimitSettings(BaseSettings):
    """What one job may ask for and how long it may take (``disagfusion.limits``). A job over a
    limit ends with an error result naming the limit; the client and the gateway refuse it
    before it is queued, and the entry stage again at admission."""

    model_config = _ENV

    max_prompt_bytes: int = Field(default=64 * 1024, ge=1)
    """UTF-8 bytes of the prompt (and, separately, of the negative prompt)."""
    max_prompt_tokens: int = Field(default=0, ge=0)
    """Tokens of the prompt (and of the negative prompt), counted by the model's own tokenizer at
    the encoder. 0: the model's own text length (what its stock pipeline would keep), so a
    prompt that the pipeline would silently truncate is an error instead. Set above the model's
    length, prompts between the two are truncated as the stock pipeline truncates them."""
    max_job_mpx_steps: float = Field(default=20_000.0, gt=0)
    """Megapixel-frames times steps per job (``height * width * frames * steps / 1e6``): 20 000
    admits 1280x720, 129 frames, 50 steps; ``inf``: no limit."""
    max_job_seconds: float = Field(default=math.inf, gt=0)
    """Predicted seconds of a job, every stage, on the reference device of its model's cost
    profile (``<model>.yaml`` in ``profiles_dir``); checked where a profile for the model exists."""
    job_deadline_s: float = Field(default=0.0, ge=0)
    """A job's deadline in seconds after submission when it sets none (``JobSpec.deadline_s``),
    and the longest one it may set; 0: none. Past it, the job ends with an error result."""


class CheckpointSettings(BaseSettings):
    """When a DiT checkpoints a denoising run, and when a draining one preempts it
    (``disagfusion.worker.checkpoints``; docs/operations.md, "Resumable denoising")."""

    model_config = _ENV

    checkpoint_every: int = Field(default=10, ge=0)
    """Checkpoint a run's latents and scheduler state every this many steps, so that a killed
    DiT's job resumes there on another instance; 0: never."""
    checkpoint_min_steps: int = Field(default=30, ge=0)
    """Jobs of fewer steps are never checkpointed: redoing them costs less than saving them."""
    preempt_min_steps: int = Field(default=10, ge=0)
    """A draining DiT checkpoints a running batch at its next step and hands it back when at
    least this many steps are left (fewer: it finishes the batch); 0: it never preempts."""


class Settings(BusSettings, TransportSettings, ModelSettings, WorkerSettings, LimitSettings, MetricsSettings,
               CheckpointSettings):
    """Everything a stage service reads (``python -m services.encoder`` and its peers)."""

    model_config = _ENV
