"""The Prometheus metrics every service shares, defined once, and the endpoint that serves them.

Services record through the small helpers below rather than touching the metric objects, so a
label set is spelled in one place. Each process serves its metrics on ``DF_METRICS_PORT``
(``serve``; the gateway on its own HTTP port instead). docs/metrics.md lists every metric.

Names follow Prometheus conventions: a counter's name ends in ``_total`` (prometheus_client adds
it), a unit is the name's last word (``_seconds``, ``_bytes``), and labels hold only bounded
sets (stages, models, transports, outcomes), never job ids.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from disagfusion.config import MetricsSettings
from disagfusion.protocol import StageState

log = logging.getLogger(__name__)

JobStatus = Literal["done", "error", "cancelled"]
"""How a job left a stage: its output handed on (or its result published), an error result, or
cancelled (for the stages that drop cancelled jobs)."""

# Compute of one batch: from a 10 ms encode to a minutes-long video denoise.
_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Handing a tensor over: from an inline copy (microseconds) to a large blob through Redis.
_HANDOFF_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

JOBS = Counter("disagfusion_jobs", "Jobs that left a stage, by how", ["stage", "model", "status"])
STAGE_SECONDS = Histogram("disagfusion_stage_seconds", "Compute seconds of one batch in a stage",
                          ["stage", "model"], buckets=_SECONDS_BUCKETS)
BATCH_SIZE = Histogram("disagfusion_batch_size", "Jobs in one computed batch", ["stage", "model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64))
HANDOFF_BYTES = Counter("disagfusion_handoff_bytes", "Tensor bytes handed between stages",
                        ["transport", "direction"])
HANDOFF_SECONDS = Histogram("disagfusion_handoff_seconds", "Seconds to put or get one tensor",
                            ["transport", "direction"], buckets=_HANDOFF_BUCKETS)
REDELIVERIES = Counter("disagfusion_redeliveries", "Tasks taken that JetStream had delivered before", ["stage"])
HANDBACKS = Counter("disagfusion_handbacks", "Tasks a worker handed back (nak) for another try or instance",
                    ["stage"])
ERRORS = Counter("disagfusion_errors", "Failures of tasks, by kind (docs/metrics.md)", ["stage", "kind"])
IN_FLIGHT = Gauge("disagfusion_in_flight_tasks", "Tasks a worker holds, from its pull to their ack", ["stage"])

SCHEDULER_DESIRED = Gauge("disagfusion_scheduler_desired_instances", "Instances the scheduler wants per stage",
                          ["stage"])
SCHEDULER_RUNNING = Gauge("disagfusion_scheduler_running_instances", "Instances running per stage, as the "
                          "scheduler's actuator sees them", ["stage"])
SCHEDULER_BACKLOG = Gauge("disagfusion_scheduler_backlog_tasks", "Tasks queued per stage at the last tick",
                          ["stage"])
SCHEDULER_TICKS = Counter("disagfusion_scheduler_ticks", "Scheduler ticks, by outcome (ok, error)", ["outcome"])
SCHEDULER_CHANGES = Counter("disagfusion_scheduler_scale_changes", "Scale changes the scheduler started",
                            ["workload", "direction"])

ENGRAM_LOOKUPS = Counter("disagfusion_engram_lookups", "Engram row lookups answered, by outcome (ok, error)",
                         ["arena", "outcome"])
ENGRAM_ROWS = Counter("disagfusion_engram_rows", "Engram rows gathered", ["arena"])
ENGRAM_LOOKUP_SECONDS = Histogram("disagfusion_engram_lookup_seconds", "Seconds to answer one lookup",
                                  ["arena"], buckets=_HANDOFF_BUCKETS)


def job_left(stage: str, model: str, status: JobStatus) -> None:
    JOBS.labels(stage, model, status).inc()


def batch_computed(stage: str, model: str, size: int, seconds: float) -> None:
    STAGE_SECONDS.labels(stage, model).observe(seconds)
    BATCH_SIZE.labels(stage, model).observe(size)


def handoff(transport: str, direction: str, nbytes: int, seconds: float) -> None:
    """One tensor put (``direction="put"``) or got (``"get"``) through ``transport``."""
    HANDOFF_BYTES.labels(transport, direction).inc(nbytes)
    HANDOFF_SECONDS.labels(transport, direction).observe(seconds)


def task_taken(stage: str, deliveries: int) -> None:
    if deliveries > 1:
        REDELIVERIES.labels(stage).inc()


def failed(stage: str, kind: str) -> None:
    ERRORS.labels(stage, kind).inc()


def scheduler_view(stages: Iterable[StageState]) -> None:
    """What the scheduler decided at a tick, per stage."""
    for view in stages:
        SCHEDULER_DESIRED.labels(view.stage).set(view.desired)
        SCHEDULER_RUNNING.labels(view.stage).set(view.running)
        SCHEDULER_BACKLOG.labels(view.stage).set(view.backlog)


def serve(settings: MetricsSettings, service: str) -> WSGIServer | None:
    """Serve this process's metrics on the first free port of ``metrics_port`` and the
    ``metrics_port_span - 1`` above it, so replicas sharing a host (compose with host
    networking, ``--scale dit=3``) each get one. The server (in a daemon thread; ``server_port``
    is the port taken), or None when off (port 0) or no port was free. A service without its metrics still serves: it says so and goes on."""
    if not settings.metrics_port:
        return None
    for port in range(settings.metrics_port, min(65536, settings.metrics_port + settings.metrics_port_span)):
        try:
            server, _ = start_http_server(port, addr=settings.metrics_host)
        except OSError:
            continue
        log.info("%s metrics at http://%s:%d/metrics", service, settings.metrics_host, server.server_port)
        return server
    log.error("%s serves no metrics: ports %d to %d on %s are all taken", service, settings.metrics_port,
              settings.metrics_port + settings.metrics_port_span - 1, settings.metrics_host)
    return None
