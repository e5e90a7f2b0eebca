"""The roles of disagfusion.auth against a real nats-server and redis-server running the
generated configuration (the conftest fixtures): each attempt a stranger or a client user might
make is refused by the server itself, and what each role needs still works."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import bcrypt
import nats
import nats.errors
import pytest
import redis

from disagfusion import bus
from disagfusion.auth import env_password, nats_config, nats_entrypoint, redis_entrypoint
from disagfusion.client import Client
from disagfusion.config import BusSettings, Settings
from disagfusion.credentials import redact
from disagfusion.job_state import CancelPending, JobStates
from disagfusion.launcher import binary, free_port, stop_process, wait_port
from disagfusion.protocol import (
    RESULTS_STREAM,
    WORK_STREAM,
    JobSpec,
    Result,
    Stage,
    StageTask,
    consumer_name,
    outputs_bucket_name,
    pack,
    result_msg_id,
    results_subject,
    task_msg_id,
    tenant_inbox,
    work_subject,
)
from disagfusion.scheduler_state import update_pins

ROOT = Path(__file__).resolve().parent.parent
REFUSED_WITHIN_S = 0.5
"""A refused JetStream request gets no answer: the server drops it and says why on the connection."""


class Connection:
    """One NATS connection that records the server's permission errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: nats.NATS | None = None

    async def open(self, url: str, tenant: str = "") -> Connection:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc).lower())

        self.nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, connect_timeout=2,
                                     inbox_prefix=tenant_inbox(tenant))
        return self

    @property
    def js(self):
        return self.nc.jetstream(timeout=REFUSED_WITHIN_S)

    async def refused(self, attempt: Callable[[Connection], Awaitable[object]], subject: str) -> bool:
        """Whether ``attempt`` failed and the server named ``subject`` in a permissions violation."""
        try:
            await attempt(self)
        except (nats.errors.TimeoutError, TimeoutError, nats.errors.NoRespondersError):
            pass
        else:
            return False
        await asyncio.sleep(0.05)  # the -ERR may trail the timeout by a moment
        return any("permissions violation" in e and subject.lower() in e for e in self.errors)


@pytest.fixture
async def streams(nats_server: str) -> None:
    stack = await bus.connect(Settings(nats_url=nats_server), "test-auth-stage")
    await bus.ensure_consumer(stack.js, Stage.DENOISE, "tiny", 30.0)
    await stack.close()


async def _purge_results(c: Connection) -> None:
    await c.js.purge_stream(RESULTS_STREAM)


async def _delete_work(c: Connection) -> None:
    await c.js.delete_stream(WORK_STREAM)


async def _delete_consumer(c: Connection) -> None:
    await c.js.delete_consumer(WORK_STREAM, consumer_name(Stage.DENOISE, "tiny"))


async def _publish_result(c: Connection) -> None:
    job = uuid.uuid4().hex
    await c.js.publish(results_subject(job), pack(Result(job_id=job, status="ok")), headers={"Nats-Msg-Id": result_msg_id(job)})


async def _skip_to_denoise(c: Connection) -> None:
    await c.js.publish(work_subject(Stage.DENOISE, "tiny"), b"\x80", headers={"Nats-Msg-Id": "x:denoise"})


async def _write_pins(c: Connection) -> None:
    await update_pins(c.js, {"dit": 9}, None)


def _js_request(subject: str, body: bytes = b"") -> Callable[[Connection], Awaitable[object]]:
    async def attempt(c: Connection) -> None:
        await c.nc.request(subject, body, timeout=REFUSED_WITHIN_S)
    return attempt


def _listen(subject: str) -> Callable[[Connection], Awaitable[object]]:
    async def attempt(c: Connection) -> None:
        await c.nc.subscribe(subject)
        await c.nc.flush()
        raise TimeoutError  # a refused subscription answers nothing; the server names it
    return attempt


def _js_publish(subject: str) -> Callable[[Connection], Awaitable[object]]:
    async def attempt(c: Connection) -> None:
        await c.js.publish(subject, b"x", headers={"Nats-Msg-Id": f"{uuid.uuid4().hex}:encode"})
    return attempt


ATTEMPTS = [
    # (who, what, attempt, the subject the server refuses)
    ("client", "purge DF_RESULTS", _purge_results, f"$JS.API.STREAM.PURGE.{RESULTS_STREAM}"),
    ("client", "delete DF_WORK", _delete_work, f"$JS.API.STREAM.DELETE.{WORK_STREAM}"),
    ("client", "delete a stage's consumer", _delete_consumer, f"$JS.API.CONSUMER.DELETE.{WORK_STREAM}"),
    ("client", "publish a result", _publish_result, "df.results."),
    ("client", "publish to a later stage's queue", _skip_to_denoise, "df.work.denoise.tiny"),
    ("client", "read another stage's subject", _listen("df.work.denoise.>"), "df.work.denoise.>"),
    ("client", "write scheduler pins", _write_pins, "DF_SCHEDULER"),
    ("gateway", "purge DF_RESULTS", _purge_results, f"$JS.API.STREAM.PURGE.{RESULTS_STREAM}"),
    ("gateway", "publish a result", _publish_result, "df.results."),
    ("stage", "purge DF_RESULTS", _purge_results, f"$JS.API.STREAM.PURGE.{RESULTS_STREAM}"),
    ("stage", "delete DF_WORK", _delete_work, f"$JS.API.STREAM.DELETE.{WORK_STREAM}"),
    ("stage", "write scheduler pins", _write_pins, "DF_SCHEDULER"),
    ("scheduler", "publish a result", _publish_result, "df.results."),
]


async def _follow_results(c: Connection) -> None:
    # its own results, but the filter is in the request body, where permissions cannot see it
    await c.js.subscribe("df.results.acme.x", stream=RESULTS_STREAM, ordered_consumer=True)


OTHER_JOB = "other.0123456789abcdef"
TENANT_ATTEMPTS = [
    # (what tenant acme tries, attempt, the subject the server refuses)
    ("read another tenant's result", _js_request(f"$JS.API.DIRECT.GET.{RESULTS_STREAM}.df.results.{OTHER_JOB}"),
     f"$JS.API.DIRECT.GET.{RESULTS_STREAM}.df.results.{OTHER_JOB}"),
    ("read a result of the shared namespace", _js_request(f"$JS.API.DIRECT.GET.{RESULTS_STREAM}.df.results.x"),
     f"$JS.API.DIRECT.GET.{RESULTS_STREAM}.df.results.x"),
    ("read results by sequence", _js_request(f"$JS.API.DIRECT.GET.{RESULTS_STREAM}", b'{"seq": 1}'),
     f"$JS.API.DIRECT.GET.{RESULTS_STREAM}"),
    ("read results with a consumer", _follow_results, f"$JS.API.CONSUMER.CREATE.{RESULTS_STREAM}"),
    ("list job ids in DF_RESULTS", _js_request(f"$JS.API.STREAM.INFO.{RESULTS_STREAM}"),
     f"$JS.API.STREAM.INFO.{RESULTS_STREAM}"),
    ("hear another tenant's results", _listen("df.results.other.*"), "df.results.other.*"),
    ("hear every result", _listen("df.results.>"), "df.results.>"),
    ("hear another tenant's events", _listen(f"df.events.{OTHER_JOB}"), f"df.events.{OTHER_JOB}"),
    ("read other clients' replies", _listen("_INBOX.>"), "_INBOX.>"),
    ("read another tenant's job state",
     _js_request(f"$JS.API.DIRECT.GET.KV_DF_JOBS.$KV.DF_JOBS.state.{OTHER_JOB}"), "$KV.DF_JOBS.state.other"),
    ("mark another tenant's job cancelled", _js_publish(f"$KV.DF_JOBS.cancel.{OTHER_JOB}"), "$KV.DF_JOBS.cancel.other"),
    ("claim another tenant's job id", _js_publish(f"$KV.DF_JOBS.spec.{OTHER_JOB}"), "$KV.DF_JOBS.spec.other"),
    ("cancel another tenant's job", _js_request(f"df.cancel.{OTHER_JOB}"), f"df.cancel.{OTHER_JOB}"),
    ("submit in the shared namespace", _js_publish("df.work.encode.tiny"), "df.work.encode.tiny"),
    ("submit in another tenant's namespace", _js_publish("df.work.encode.tiny.other"), "df.work.encode.tiny.other"),
    ("publish its own job's result", _js_publish("df.results.acme.x"), "df.results.acme.x"),
    ("read the shared outputs", _js_request("$JS.API.STREAM.INFO.OBJ_DF_OUTPUTS"), "$JS.API.STREAM.INFO.OBJ_DF_OUTPUTS"),
    ("read another tenant's outputs", _js_request("$JS.API.STREAM.INFO.OBJ_DF_OUTPUTS_other"),
     "$JS.API.STREAM.INFO.OBJ_DF_OUTPUTS_other"),
]


@pytest.mark.parametrize(("what", "attempt", "subject"), TENANT_ATTEMPTS, ids=[w for w, *_ in TENANT_ATTEMPTS])
async def test_a_tenant_is_refused(streams, nats_server: str, role_url, what: str, attempt, subject: str) -> None:
    c = await Connection().open(role_url(nats_server, "acme"), tenant="acme")
    try:
        assert await c.refused(attempt, subject), f"tenant acme could {what} (errors seen: {c.errors})"
    finally:
        await c.nc.close()


async def test_a_tenant_reads_its_own_jobs_and_nothing_else(streams, nats_server: str, role_url) -> None:
    """The other side of the tenant table, with the Client a tenant uses: its job id is
    qualified, it reads its result, state and large output, and cancels; the shared client
    still reads every job (its role is trusted with all), another tenant reads nothing of it."""
    settings = Settings(nats_url=role_url(nats_server, "acme"), tenant="acme")
    stage = await bus.connect(Settings(nats_url=nats_server), "test-auth-stage")
    await bus.jobs_bucket(stage.js, Settings())
    async with Client(settings) as acme:
        spec = JobSpec(prompt="a lighthouse", model="tiny", steps=2, width=64, height=64)
        job = await acme.submit(spec)
        assert job == f"acme.{spec.job_id}"
        assert (await acme.state(spec.job_id)).state == "queued"  # its own ids may be given unqualified
        with pytest.raises(ValueError, match="tenant 'other'"):
            await acme.lookup(OTHER_JOB)
        task = await stage.js.pull_subscribe_bind(await bus.ensure_consumer(stage.js, Stage.ENCODE, "tiny", 30.0), WORK_STREAM)
        [msg] = await task.fetch(1, timeout=5)
        assert msg.subject == "df.work.encode.tiny.acme"
        await msg.ack()
        # a decoder's large output, in the tenant's own bucket, and its result
        await (await bus.outputs_bucket(stage.js, Settings(), outputs_bucket_name(job))).put(f"{job}.png", b"big image")
        result = Result(job_id=job, status="ok", object_name=f"{job}.png", content_type="image/png")
        waiting = asyncio.create_task(acme.result(job, timeout=10))
        await asyncio.sleep(0.2)
        await bus.publish(stage.js, results_subject(job), pack(result), result_msg_id(job))
        assert await waiting == result
        assert await acme.output(result) == b"big image"
        assert [r.job_id async for r in acme.run_many([])] == []
    async with Client(Settings(nats_url=role_url(nats_server, "client"))) as shared:
        assert await shared.lookup(job) == result
    async with Client(Settings(nats_url=role_url(nats_server, "other"), tenant="other")) as other:
        assert await other.lookup(spec.job_id) is None  # "other.<id>": its own namespace, empty
    await stage.close()


@pytest.mark.parametrize(("role", "what", "attempt", "subject"), ATTEMPTS, ids=[f"{r}: {w}" for r, w, *_ in ATTEMPTS])
async def test_a_role_is_refused(streams, nats_server: str, role_url, role: str, what: str, attempt, subject: str) -> None:
    c = await Connection().open(role_url(nats_server, role))
    try:
        assert await c.refused(attempt, subject), f"{role} could {what} (errors seen: {c.errors})"
    finally:
        await c.nc.close()


async def test_strangers_are_refused_by_nats_and_redis(nats_server: str, redis_server: str, role_url) -> None:
    for url in (role_url(nats_server, None), nats_server.replace("stage-test-password", "guessed")):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    for url in (role_url(redis_server, None), role_url(redis_server, "client"),
                redis_server.replace("stage-test-password", "guessed")):
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url).set("df:blob:x", b"1")
    stage = redis.Redis.from_url(redis_server)
    stage.set("df:blob:allowed", b"1", ex=10)
    with pytest.raises(redis.exceptions.NoPermissionError):
        stage.set("scheduler:pins", b"x")  # outside the stage's key pattern
    with pytest.raises(redis.exceptions.NoPermissionError):
        stage.flushall()


async def test_a_spoofed_result_is_refused_and_the_real_one_arrives(streams, nats_server: str, role_url) -> None:
    """The attack of issue 21: a client publishes ``df.results.<job>`` with the job's result
    Nats-Msg-Id before the real result, so JetStream would drop the real one as a duplicate."""
    job = JobSpec(prompt="a lighthouse", model="tiny", steps=2, width=64, height=64)
    client_url = role_url(nats_server, "client")
    async with Client(Settings(nats_url=client_url)) as client:
        await client.submit(job)  # the client's own job, submitted with its own user
        attacker = await Connection().open(client_url)
        fake = Result(job_id=job.job_id, status="ok", data=b"forged", content_type="image/png")

        async def spoof(c: Connection) -> None:
            await c.js.publish(results_subject(job.job_id), pack(fake), headers={"Nats-Msg-Id": result_msg_id(job.job_id)})

        assert await attacker.refused(spoof, results_subject(job.job_id))
        await attacker.nc.close()

        stage = await bus.connect(Settings(nats_url=nats_server), "test-auth-decoder")
        real = Result(job_id=job.job_id, status="ok", data=b"real image", content_type="image/png")
        ack = await stage.js.publish(results_subject(job.job_id), pack(real), headers={"Nats-Msg-Id": result_msg_id(job.job_id)})
        assert not ack.duplicate
        await stage.close()
        assert (await client.result(job.job_id, timeout=10)).data == b"real image"


async def test_each_role_can_do_its_work(streams, nats_server: str, role_url) -> None:
    """The other side of the table: what the roles are for is allowed."""
    admin = await bus.connect(Settings(nats_url=role_url(nats_server, "admin")), "test-auth-admin")
    assert await update_pins(admin.js, {"dit": 2}, None) == {"dit": 2}
    await admin.close()
    scheduler = await bus.connect(Settings(nats_url=role_url(nats_server, "scheduler")), "test-auth-scheduler")
    assert await update_pins(scheduler.js, {}, []) == {}
    info = await scheduler.js.consumer_info(WORK_STREAM, consumer_name(Stage.DENOISE, "tiny"))
    assert info.num_pending >= 0
    await scheduler.close()
    gateway = await bus.connect(Settings(nats_url=role_url(nats_server, "gateway")), "test-auth-gateway")
    await gateway.js.consumer_info(WORK_STREAM, consumer_name(Stage.DENOISE, "tiny"))
    await gateway.close()
    stage = await bus.connect(Settings(nats_url=nats_server), "test-auth-stage")
    job = uuid.uuid4().hex
    task = StageTask(job=JobSpec(job_id=job, prompt="p", model="tiny", steps=2, width=64, height=64), stage=Stage.DENOISE)
    await bus.publish(stage.js, work_subject(Stage.DENOISE, "tiny"), pack(task), task_msg_id(job, Stage.DENOISE))
    # a large output in DF_OUTPUTS and its result, as a decoder leaves them
    await (await bus.outputs_bucket(stage.js, Settings())).put(f"{job}.png", b"big image")
    result = Result(job_id=job, status="ok", object_name=f"{job}.png", content_type="image/png")
    await bus.publish(stage.js, results_subject(job), pack(result), result_msg_id(job))
    await stage.close()
    async with Client(Settings(nats_url=role_url(nats_server, "client"))) as client:  # what a client reads
        found = await client.lookup(job)
        assert found is not None and await client.output(found) == b"big image"
        for name in ("../../etc/passwd", f"{job}/x.png", "a.png\x00"):  # never a path
            with pytest.raises(ValueError, match="malformed"):
                await client.output(found.model_copy(update={"object_name": name}))


async def test_a_client_cancels_and_a_stage_answers(streams, nats_server: str, role_url) -> None:
    """A client user cannot publish a result, so its cancel is answered by a stage (the one
    publisher of results); with no stage running, the cancel says so and stays marked."""
    stage = await bus.connect(Settings(nats_url=nats_server), "test-auth-stage")
    await bus.jobs_bucket(stage.js, Settings())  # made by the first stage, as in a stack
    async with Client(Settings(nats_url=role_url(nats_server, "client"))) as client:
        job = JobSpec(prompt="a lighthouse", model="tiny", steps=2, width=64, height=64)
        await client.submit(job)
        with pytest.raises(CancelPending, match="no stage is running"):
            await client.cancel(job.job_id)
        states = await JobStates.open(stage, Settings(nats_url=nats_server), "test-auth-stage")
        try:
            result = await client.cancel(job.job_id)
        finally:
            await states.close()
            await stage.close()
        assert (result.status, result.error) == ("cancelled", "cancelled by client")
        assert (await client.lookup(job.job_id)) == result


def test_settings_carry_credentials_and_production_refuses_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    settings = BusSettings(nats_url="nats://a:4222,nats://b:4222", nats_user="stage", nats_password="s3cret")
    assert settings.nats_url == "nats://stage:s3cret@a:4222,nats://stage:s3cret@b:4222"
    assert redact(settings.nats_url) == "nats://stage:***@a:4222,nats://stage:***@b:4222"
    (tmp_path / "secret").write_text("from-a-file\n")
    assert BusSettings(nats_url="nats://a:4222", nats_user="u", nats_password_file=tmp_path / "secret").nats_url \
        == "nats://u:from-a-file@a:4222"
    monkeypatch.setenv("DF_ENV", "production")
    for bad in ({}, {"nats_user": "stage", "nats_password": "df-dev-stage"}, {"nats_user": "stage", "nats_password": "short"}):
        with pytest.raises(ValueError, match="DF_ENV=production"):
            BusSettings(nats_url="nats://a:4222", **bad)
    assert BusSettings(nats_url="nats://a:4222", nats_user="stage", nats_password="x" * 24).nats_url.startswith("nats://stage:")
    with pytest.raises(ValueError, match="Redis"):
        Settings(nats_url="nats://stage:" + "x" * 24 + "@a:4222", transport="redis")  # Redis left without one


async def test_tls_with_the_roles(nats_tls_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/security.md's TLS: a ``tls://`` URL with the role's credentials works once the
    server's certificate is trusted (SSL_CERT_FILE for a private CA), and not before."""
    url, cert = nats_tls_server
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    stack = await bus.connect(Settings(nats_url=url), "test-auth-tls")
    assert (await stack.js.stream_info(WORK_STREAM)).config.name == WORK_STREAM
    await stack.close()


async def test_client_certificates_with_the_roles(nats_mtls_server, role_url) -> None:
    """docs/security.md's client certificates: a server with ``verify: true`` refuses a client
    without one (the password alone is not enough) and serves one with DF_NATS_TLS_CERT/_KEY, for
    the services' connections and a client's alike."""
    server = nats_mtls_server
    trusting = Settings(nats_url=server.url, nats_tls_ca=server.ca).nats_tls()
    with pytest.raises(Exception):  # noqa: B017 (the TLS alert surfaces as an SSL or a connection error)
        await nats.connect(server.url, tls=trusting, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    with_cert = {"nats_tls_ca": server.ca, "nats_tls_cert": server.client_cert, "nats_tls_key": server.client_key}
    same_call = Settings(nats_url=server.url, **with_cert).nats_tls()  # the refusal was the certificate's
    await (await nats.connect(server.url, tls=same_call, allow_reconnect=False, max_reconnect_attempts=0,
                              connect_timeout=2)).close()
    stack = await bus.connect(Settings(nats_url=server.url, **with_cert), "test-auth-mtls")
    assert (await stack.js.stream_info(WORK_STREAM)).config.name == WORK_STREAM
    await stack.close()
    async with Client(Settings(nats_url=role_url(server.url, "client"), **with_cert)) as client:
        assert await client.lookup(uuid.uuid4().hex) is None
    with pytest.raises(ValueError, match="DF_NATS_TLS_CERT and DF_NATS_TLS_KEY go together"):
        Settings(nats_url=server.url, nats_tls_cert=server.client_cert)


SHIPPED = [("deploy/nats/auth.conf", nats_config), ("deploy/k8s/base/nats-auth.conf", nats_config),
           ("deploy/nats/entrypoint.sh", nats_entrypoint), ("deploy/k8s/base/nats-entrypoint.sh", nats_entrypoint),
           ("deploy/redis/users.sh", redis_entrypoint), ("deploy/k8s/base/redis-users.sh", redis_entrypoint)]


@pytest.mark.parametrize(("path", "generate"), SHIPPED, ids=[p for p, _ in SHIPPED])
def test_the_shipped_server_configs_are_the_generated_ones(path: str, generate) -> None:
    """compose and Kubernetes run the users of disagfusion.auth: regenerate these files with
    ``python -m disagfusion.auth nats`` (or ``redis``) when the roles change."""
    assert (ROOT / path).read_text() == generate(), f"regenerate {path}: python -m disagfusion.auth nats|nats-entrypoint|redis"


async def test_the_shipped_servers_read_passwords_from_secret_files(tmp_path: Path) -> None:
    """deploy/nats/entrypoint.sh and deploy/redis/users.sh, run as compose runs them but on this
    machine's server binaries: each role's password comes from ``*_PASSWORD_FILE`` where set (a
    secret), and wins over the plain variable. Passwords nats-server would parse as something
    else (a leading ``-``, a size, a number) still work: the entrypoint quotes them; and a bcrypt
    hash given to nats-server admits the password it hashes."""
    env = {"PATH": f"{Path(binary('nats-server')).parent}:/usr/bin:/bin"}
    for server, roles in (("nats", ("client", "gateway", "stage", "scheduler", "admin")), ("redis", ("stage", "admin"))):
        for role in roles:
            secret = tmp_path / f"{server}-{role}"
            secret.write_text({"client": "-client-from-a-file", "gateway": "12KB", "scheduler": "9"}.get(role, role) + "\n")
            env[env_password(role, server) + "_FILE"] = str(secret)
            env[env_password(role, server)] = "not-this-one"
    # The server may hold a bcrypt hash instead, while the services keep the password itself.
    (tmp_path / "nats-admin").write_text(bcrypt.hashpw(b"admin-plain", bcrypt.gensalt(4)).decode())
    nats_port, redis_port = free_port(), free_port()
    servers = [
        subprocess.Popen(["sh", str(ROOT / "deploy/nats/entrypoint.sh"), "-c", str(ROOT / "deploy/nats/auth.conf"), "-js",
                          "-a", "127.0.0.1", "-p", str(nats_port), "-sd", str(tmp_path / "js")], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen(["sh", str(ROOT / "deploy/redis/users.sh"), binary("redis-server"), "--bind", "127.0.0.1",
                          "--port", str(redis_port), "--save", "", "--dir", str(tmp_path)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        wait_port(nats_port, servers[0], "nats-server")
        wait_port(redis_port, servers[1], "redis-server")
        nc = await nats.connect(f"nats://client:-client-from-a-file@127.0.0.1:{nats_port}", allow_reconnect=False)
        await nc.close()
        nc = await nats.connect(f"nats://gateway:12KB@127.0.0.1:{nats_port}", allow_reconnect=False)
        await nc.close()
        nc = await nats.connect(f"nats://admin:admin-plain@127.0.0.1:{nats_port}", allow_reconnect=False)
        await nc.close()
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(f"nats://client:not-this-one@127.0.0.1:{nats_port}", allow_reconnect=False,
                               max_reconnect_attempts=0, connect_timeout=2)
        assert redis.Redis.from_url(f"redis://stage:stage@127.0.0.1:{redis_port}/0").set("df:x", b"1")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(f"redis://stage:not-this-one@127.0.0.1:{redis_port}/0").ping()
    finally:
        for proc in servers:
            stop_process(proc)
