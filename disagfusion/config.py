"""Settings, read from the environment (``DF_*``) so compose.yaml, the embedded launcher and a
shell all configure a service the same way.

Each group is its own class, so a process reads only what it uses: a client needs the bus; a
stage worker (``Settings``) the bus, the tensor transports, its models and its worker loop.
The engram store and the scheduler own their settings, in their service packages.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def comma_list(value: object) -> object:
    """Comma-separated text (an environment variable, a command-line flag) as its non-empty,
    stripped items; anything else unchanged. For ``BeforeValidator``s and ``split`` alike."""
    return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value


SHIPPED_PROFILES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "profiles"
"""The cost profiles in the source tree (deploy/profiles/); the image copies them elsewhere."""

_ENV = SettingsConfigDict(env_prefix="DF_", extra="ignore")


class BusSettings(BaseSettings):
    """How to reach NATS, and what every service that connects to it shares."""

    model_config = _ENV

    nats_url: str = "nats://127.0.0.1:4222"
    """One server, or the comma-separated nodes of a cluster (a client fails over between them)."""
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


class TransportSettings(BaseSettings):
    """How stage outputs reach the next stage."""

    model_config = _ENV

    redis_url: str = "redis://127.0.0.1:6379/0"
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


class Settings(BusSettings, TransportSettings, ModelSettings, WorkerSettings):
    """Everything a stage service reads (``python -m services.encoder`` and its peers)."""

    model_config = _ENV
