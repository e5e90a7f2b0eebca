"""Who may do what on NATS and Redis: one user per role, described once here, rendered into the
nats-server authorization block and the Redis ACL that every deployment (the embedded stack,
compose, Kubernetes) runs with.

NATS permissions are subject lists: what a user may publish (including the JetStream API
requests, ``$JS.API.<operation>.<stream>...``, and key-value/object-store writes, ``$KV.``/``$O.``)
and what it may subscribe to. Each role is built from named grants below, so a new feature adds
its subjects to one grant (or a new one) instead of editing five lists. Anything a role does not
list is refused by the server: a client publishing ``df.results.<job>`` gets a permissions
violation and nothing is stored.

Roles:
- ``client``: submits jobs (``df.work.encode.<model>``), reads results, events, outputs and job
  state, requests cancellation. No result publishing, no stream/consumer deletion or purge, no
  other stage's queue, no scheduler state, no Redis.
- ``gateway``: a client that also reads queue depths, writes job state and watches arrivals and
  workers for its dashboard.
- ``stage``: the stage services (encoder, dit, decoder, pipeline, engram_store): everything on
  ``df.>`` and the JetStream operations they need, never stream deletion or purge, never the
  scheduler's bucket.
- ``scheduler``: reads the bus and the queues, writes its own bucket.
- ``admin``: everything (the operator's CLI: dead-letter replay and purge, pins).

Tenants: a user per tenant (``tenant_grant``), a client confined to its own namespace. It
submits on ``df.work.encode.<model>.<tenant>`` jobs ``<tenant>.<id>``, and reads only those
jobs' results, events, states and outputs: every read names its subject in the request's subject
(``DIRECT.GET.<stream>.<subject>``, core subscriptions), where the server checks it, and its
outputs have a bucket of their own. The shared ``client`` and ``gateway`` roles read every job.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from disagfusion.credentials import check_tenant_format
from disagfusion.protocol import (
    ATTEMPTS_BUCKET,
    CHECKPOINTS_BUCKET,
    DLQ_STREAM,
    ENGRAM_ARENAS_BUCKET,
    HANDBACKS_BUCKET,
    JOBS_BUCKET,
    OUTPUTS_BUCKET,
    RESULTS_STREAM,
    SCHEDULER_BUCKET,
    WORK_STREAM,
    Stage,
    cancel_subject,
    events_subject,
    outputs_bucket_name,
    qualified,
    results_subject,
    tenant_inbox,
    work_subject,
)


API = "$JS.API"


def kv(bucket: str) -> str:
    """The stream behind a key-value bucket."""
    return f"KV_{bucket}"


def obj(bucket: str) -> str:
    """The stream behind an object-store bucket."""
    return f"OBJ_{bucket}"


@dataclass(frozen=True)
class Grant:
    """Subjects a user may publish to and subscribe to, for one purpose."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()

    def __or__(self, other: Grant) -> Grant:
        return Grant(_merge(self.publish, other.publish), _merge(self.subscribe, other.subscribe))


def _merge(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(a + b))


def read_stream(stream: str) -> Grant:
    """Look at a stream and read it through an ephemeral or ordered consumer (delivered to an
    ``_INBOX`` subject), or message by message (``DIRECT.GET``/``MSG.GET``, as KV gets do)."""
    return Grant(publish=(
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}",  # ephemeral, unnamed (older servers)
        f"{API}.CONSUMER.CREATE.{stream}.>",  # named: <consumer>[.<filter>]
        f"{API}.STREAM.MSG.GET.{stream}",
        f"{API}.DIRECT.GET.{stream}",
        f"{API}.DIRECT.GET.{stream}.>",
        f"$JS.FC.{stream}.>",  # flow-control answers of ordered consumers
    ))


def write_kv(bucket: str) -> Grant:
    """Put and delete keys (a delete is a put with a marker header), and read them."""
    return read_stream(kv(bucket)) | Grant(publish=(f"$KV.{bucket}.>",))


BASE = Grant(
    publish=(f"{API}.INFO", f"{API}.STREAM.NAMES"),  # account limits; which stream holds a subject
    subscribe=("_INBOX.>",),  # request replies: publish acks, API answers, consumer deliveries
)
"""What every connection needs to use JetStream at all. Replies go to the requester's inbox; only
services publish to ``_INBOX.>`` (a client could otherwise answer another's request)."""

SEE_STREAMS = Grant(publish=tuple(f"{API}.STREAM.INFO.{s}" for s in (WORK_STREAM, RESULTS_STREAM, DLQ_STREAM)))
"""``bus.connect`` checks that the streams exist (it creates them only where it may)."""

JOB_KEYS = ("spec", "state", "cancel")
"""The keys a client writes in ``DF_JOBS`` per job: ``<key>.<job_id>`` (``disagfusion.job_state``)."""

SUBMIT = Grant(publish=("df.work.encode.*", "df.cancel.>", *(f"$KV.{JOBS_BUCKET}.{key}.>" for key in JOB_KEYS)))
"""A client enters jobs at the first stage only, marks them queued, and may cancel them (a cancel
mark in ``DF_JOBS``, then a request on ``df.cancel.<job_id>``: a stage answers it with the job's
``cancelled`` result)."""

FOLLOW = (
    Grant(subscribe=("df.results.>", "df.events.>"))
    | read_stream(RESULTS_STREAM)
    | read_stream(obj(OUTPUTS_BUCKET))
    | read_stream(kv(JOBS_BUCKET))
)
"""Results (live or replayed from DF_RESULTS), progress events, large outputs and job state."""

MONITOR = Grant(publish=(
    f"{API}.STREAM.LIST", f"{API}.STREAM.INFO.*",
    f"{API}.CONSUMER.INFO.*.*", f"{API}.CONSUMER.LIST.*", f"{API}.CONSUMER.NAMES.*",
)) | read_stream(kv(SCHEDULER_BUCKET))
"""Queue depths, consumer lag and the scheduler's view: what dashboards and the scheduler read."""

BUCKET_STREAMS = (kv(HANDBACKS_BUCKET), kv(ATTEMPTS_BUCKET), kv(ENGRAM_ARENAS_BUCKET), kv(JOBS_BUCKET),
                  kv(CHECKPOINTS_BUCKET), obj(OUTPUTS_BUCKET))

SERVE = Grant(
    publish=(
        "df.>",  # tasks, results, events, metrics, dead letters, engram lookups, tensor pulls
        "_INBOX.>",  # answers to requests (engram lookups, tensor pulls)
        f"$JS.ACK.{WORK_STREAM}.>", f"$JS.ACK.{DLQ_STREAM}.>",
        *(f"{API}.STREAM.CREATE.{s}" for s in (WORK_STREAM, RESULTS_STREAM, DLQ_STREAM, *BUCKET_STREAMS)),
        # Stream limits set by the services' settings (disagfusion.stream_limits).
        *(f"{API}.STREAM.UPDATE.{s}" for s in (WORK_STREAM, RESULTS_STREAM, obj(OUTPUTS_BUCKET))),
        f"{API}.CONSUMER.CREATE.{WORK_STREAM}.>", f"{API}.CONSUMER.DURABLE.CREATE.{WORK_STREAM}.*",
        f"{API}.CONSUMER.MSG.NEXT.{WORK_STREAM}.*",
        # The short-lived consumer an encoder uses to answer jobs for unserved models. NATS
        # wildcards match whole tokens only, so this allows deleting any DF_WORK consumer; the
        # stage user is a trusted service, the point is that clients cannot.
        f"{API}.CONSUMER.DELETE.{WORK_STREAM}.*",
        f"$O.{OUTPUTS_BUCKET}.>",
        # Tenants' output buckets, made on a tenant's first large output (NATS wildcards match
        # whole tokens, so OBJ_DF_OUTPUTS_<tenant> cannot be named narrower).
        f"{API}.STREAM.CREATE.*", "$O.*.>", f"{API}.STREAM.MSG.GET.*", f"{API}.DIRECT.GET.*", f"{API}.DIRECT.GET.*.>",
    ),
    subscribe=("df.>",),
) | MONITOR | FOLLOW | read_stream(WORK_STREAM) | read_stream(DLQ_STREAM) | write_kv(HANDBACKS_BUCKET) | write_kv(ATTEMPTS_BUCKET) | write_kv(ENGRAM_ARENAS_BUCKET) \
    | write_kv(JOBS_BUCKET) | write_kv(CHECKPOINTS_BUCKET)
"""The stage services: the whole ``df.>`` namespace among themselves, creating the streams and
buckets they use, consuming their queues, reading the queues and dead letters message by
message. Never deleting or purging a stream, never the scheduler's bucket."""

OBSERVE = Grant(subscribe=("df.work.encode.>", "df.presence.*"))
"""The gateway's dashboard: arrivals and live workers. Like every client, it publishes no result."""

SCHEDULE = MONITOR | write_kv(SCHEDULER_BUCKET) | Grant(
    publish=(f"{API}.STREAM.CREATE.{kv(SCHEDULER_BUCKET)}",),
    subscribe=("df.work.>", "df.metrics.>", "df.results.>"),  # arrivals, timings, completions
)

EVERYTHING = Grant(publish=(">",), subscribe=(">",))


@dataclass(frozen=True)
class Role:
    name: str
    grant: Grant
    redis_keys: tuple[str, ...] = ()
    """Redis key patterns this role may use; none: no Redis user."""
    redis_commands: str = ""
    description: str = ""


STAGE_REDIS_COMMANDS = "-@all +@read +@write +@keyspace +@connection -@dangerous -@admin"
"""Blob get/set/delete with a TTL, and ping; no FLUSHALL, KEYS, CONFIG, DEBUG or ACL."""

ROLES: dict[str, Role] = {
    role.name: role
    for role in (
        Role("client", BASE | SEE_STREAMS | SUBMIT | FOLLOW,
             description="submit jobs, read their results, events, outputs and state, ask to cancel"),
        Role("gateway", BASE | SEE_STREAMS | SUBMIT | FOLLOW | MONITOR | write_kv(JOBS_BUCKET) | OBSERVE,
             description="a client that also reads queue depths, writes job state and watches the "
                         "stages for its dashboard"),
        Role("stage", BASE | SERVE, redis_keys=("df:*",), redis_commands=STAGE_REDIS_COMMANDS,
             description="encoder, dit, decoder, pipeline, engram_store"),
        Role("scheduler", BASE | SEE_STREAMS | SCHEDULE, description="reads the bus and queues, writes DF_SCHEDULER"),
        Role("admin", EVERYTHING, redis_keys=("*",), redis_commands="+@all",
             description="operators and the CLI: everything, including DLQ purge and scheduler pins"),
    )
}

def tenant_grant(tenant: str) -> Grant:
    """What tenant ``tenant`` may do: submit and cancel its own jobs, write their keys in
    ``DF_JOBS``, and read their results, events, states and outputs; see the entry queue's depth.
    Its replies come to its own inbox. Nothing of another tenant's or of the shared namespace."""
    own = qualified("*", tenant)  # its job ids, <tenant>.*
    return Grant(
        publish=(
            f"{API}.INFO",
            f"{API}.STREAM.NAMES",  # which stream holds a subject (reading an object does ask)
            f"{API}.STREAM.INFO.{WORK_STREAM}",  # the queue's depth (DF_MAX_QUEUE_DEPTH)
            f"{API}.STREAM.INFO.{kv(JOBS_BUCKET)}",  # opening the bucket
            work_subject(Stage.ENCODE, "*", tenant),
            cancel_subject(own),
            *(f"$KV.{JOBS_BUCKET}.{key}.{own}" for key in JOB_KEYS),
            f"{API}.DIRECT.GET.{RESULTS_STREAM}.{results_subject(own)}",
            *(f"{API}.DIRECT.GET.{kv(JOBS_BUCKET)}.$KV.{JOBS_BUCKET}.{key}.{own}" for key in JOB_KEYS),
        ),
        subscribe=(f"{tenant_inbox(tenant)}.>", results_subject(own), events_subject(own)),
    ) | read_stream(obj(outputs_bucket_name(qualified("x", tenant))))


def check_tenant_name(tenant: str) -> str:
    """``tenant`` if it can be a tenant: spelled as one (``credentials.TENANT_NAME``), and no role's name."""
    check_tenant_format(tenant)
    if tenant in ROLES:
        raise ValueError(f"{tenant!r} is a role's user and cannot be a tenant's")
    return tenant


SERVICE_ROLES = {"gateway": "gateway", "scheduler": "scheduler"}
"""Compose services that do not run as ``stage``."""


def service_role(service: str) -> str:
    return SERVICE_ROLES.get(service, "stage")


def env_password(role: str, server: str) -> str:
    """The environment variable holding ``role``'s (or a tenant's) password for ``server`` (nats
    or redis): ``DF_NATS_STAGE_PASSWORD``, ``DF_NATS_TENANT_ACME_CO_PASSWORD`` for tenant
    ``acme-co``. nats-server reads ``$NAME`` from its own environment."""
    name = role.upper() if role in ROLES else "TENANT_" + role.upper().replace("-", "_")
    return f"DF_{server.upper()}_{name}_PASSWORD"


@dataclass(frozen=True)
class Tls:
    """Server side TLS for NATS: clients then connect with ``tls://`` URLs."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    verify: bool = False
    """Also ask clients for a certificate signed by ``ca_file``."""


def nats_config(passwords: Mapping[str, str] | None = None, tls: Tls | None = None,
                tenants: Iterable[str] = ()) -> str:
    """The nats-server ``authorization`` block (and ``tls`` block) for every role and tenant.

    ``passwords``: role or tenant -> password, written into the file (the embedded stack keeps
    it mode 0600). None: each password is the environment variable ``env_password(name, "nats")``
    of the server's process (compose and Kubernetes pass them from secrets)."""
    users = [(role.name, role.grant, role.description) for role in ROLES.values()]
    users += [(check_tenant_name(t), tenant_grant(t), f"tenant {t}") for t in tenants]
    blocks = []
    for name, grant, description in users:
        password = json.dumps(passwords[name]) if passwords is not None else "$" + env_password(name, "nats")
        permissions = {"publish": {"allow": list(grant.publish)}, "subscribe": {"allow": list(grant.subscribe)}}
        blocks.append(f"    # {name}: {description}\n"
                      f"    {{user: {json.dumps(name)}, password: {password},\n"
                      f"     permissions: {json.dumps(permissions)}}}")
    lines = ["# Generated by disagfusion.auth (python -m disagfusion.auth nats); do not edit.",
             "authorization {", "  users: [", ",\n".join(blocks), "  ]", "}"]
    if tls is not None:
        lines += ["tls {", f"  cert_file: {json.dumps(str(tls.cert_file))}", f"  key_file: {json.dumps(str(tls.key_file))}"]
        if tls.ca_file is not None:
            lines.append(f"  ca_file: {json.dumps(str(tls.ca_file))}")
        lines += [f"  verify: {json.dumps(tls.verify)}", "}"]
    return "\n".join(lines) + "\n"


def redis_acl(passwords: Mapping[str, str]) -> list[str]:
    """Redis ACL rules, one ``user`` line per role that uses Redis; the default user is off, so
    a connection without credentials can run no command."""
    rules = ["user default off resetkeys -@all"]
    for role in ROLES.values():
        if role.redis_keys:
            keys = " ".join(f"~{pattern}" for pattern in role.redis_keys)
            rules.append(f"user {role.name} on >{passwords[role.name]} resetkeys {keys} resetchannels {role.redis_commands}")
    return rules


def _password_files(server: str, roles: list[str]) -> list[str]:
    """Shell lines giving each role's password variable the content of the file that
    ``$DF_<SERVER>_<ROLE>_PASSWORD_FILE`` names, when set (a compose or Kubernetes secret)."""
    lines = []
    for role in roles:
        var = env_password(role, server)
        lines.append(f'if [ -n "${{{var}_FILE:-}}" ]; then {var}=$(cat "${var}_FILE"); export {var}; fi')
    return lines


def redis_entrypoint() -> str:
    """A shell entrypoint for a redis-server container: runs its command with the ACL rules
    appended as ``--user`` arguments, each password from ``$DF_REDIS_<ROLE>_PASSWORD`` or the
    file ``$DF_REDIS_<ROLE>_PASSWORD_FILE`` names (an ACL file cannot read the environment).
    deploy/redis/users.sh holds it."""
    args = []
    for rule in redis_acl({role: f"${{{env_password(role, 'redis')}:?}}" for role in ROLES}):
        words = rule.split()
        args.append(" ".join(["--user", *(f'"{w}"' for w in words[1:])]))
    return "\n".join([
        "#!/bin/sh",
        "# Generated by disagfusion.auth (python -m disagfusion.auth redis); do not edit.",
        "set -e",
        *_password_files("redis", [role.name for role in ROLES.values() if role.redis_keys]),
        "# The official image's entrypoint drops root before starting the server; keep it.",
        'if command -v docker-entrypoint.sh >/dev/null 2>&1; then set -- docker-entrypoint.sh "$@"; fi',
        'exec "$@" \\\n  ' + " \\\n  ".join(args),
    ]) + "\n"


def nats_entrypoint(tenants: Iterable[str] = ()) -> str:
    """A shell entrypoint for a nats-server container (compose, Kubernetes): runs ``nats-server``
    with its flags, each role's password in ``$DF_NATS_<ROLE>_PASSWORD`` (which
    deploy/nats/auth.conf reads) or in the file ``$DF_NATS_<ROLE>_PASSWORD_FILE`` names.

    nats-server parses a variable's value as a config value, so a password such as ``-x...`` (one
    ``secrets.token_urlsafe`` password in 64), ``9`` or ``true`` would stop it from starting or
    not be a string: each is handed over in quotes. An unset password stops it with its name.
    deploy/nats/entrypoint.sh holds it (for no tenants)."""
    users = [*ROLES, *(check_tenant_name(t) for t in tenants)]
    quoted = []
    for user in users:
        var = env_password(user, "nats")
        quoted.append(f': "${{{var}:?is not set (nor {var}_FILE)}}"; {var}="\\"${var}\\""; export {var}')
    return "\n".join([
        "#!/bin/sh",
        "# Generated by disagfusion.auth (python -m disagfusion.auth nats-entrypoint); do not edit.",
        "set -e",
        *_password_files("nats", users),
        *quoted,
        'exec nats-server "$@"',
    ]) + "\n"


GENERATED = {"nats": nats_config, "nats-entrypoint": nats_entrypoint, "redis": redis_entrypoint}
"""What ``python -m disagfusion.auth WHAT`` prints: deploy/nats/auth.conf, deploy/nats/entrypoint.sh,
deploy/redis/users.sh."""


def main(argv: list[str] | None = None) -> None:
    """``python -m disagfusion.auth nats|nats-entrypoint|redis [--tenant NAME]...``: print
    deploy/nats/auth.conf (passwords as ``$DF_NATS_<ROLE>_PASSWORD`` references),
    deploy/nats/entrypoint.sh or deploy/redis/users.sh, with a user per tenant named."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m disagfusion.auth")
    parser.add_argument("what", nargs="?", default="nats", choices=list(GENERATED))
    parser.add_argument("--tenant", action="append", default=[], help="a tenant's user (repeat for more)")
    args = parser.parse_args(argv)
    if args.tenant and args.what == "redis":
        parser.error("tenants have no Redis user (clients never touch Redis)")
    try:
        text = GENERATED[args.what](**({"tenants": args.tenant} if args.tenant else {}))
    except ValueError as exc:
        parser.error(str(exc))
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
