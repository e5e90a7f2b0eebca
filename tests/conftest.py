"""Shared fixtures: real servers (nats-server with JetStream, redis-server) on free loopback
ports, the models directory holding the presets, and the stock diffusers pipeline of each
family as the reference for its images."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import nats
import nats.errors
import nats.js.errors
import numpy as np
import pytest
import torch

from disagfusion.auth import Tls, nats_config
from disagfusion.bus import Bus, connect
from disagfusion.config import Settings
from disagfusion.launcher import ServerAuth, binary, free_port, stop_process, wait_port, write_server_auth
from disagfusion.models import model_directory, model_family
from disagfusion.models.family import DiffusersFamily
from disagfusion.protocol import JobSpec

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


@contextmanager
def _server(command: list[str], port: int, what: str, log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_port(port, proc, what)
        yield proc
    finally:
        if proc.poll() is None:
            stop_process(proc)


# Every server runs with the users of disagfusion.auth, as deployments do, and the fixtures hand
# out URLs carrying the stage role's credentials (what the stage services use); ``as_role`` gives
# another role's URL.
TEST_TENANTS = ("acme", "other")
"""Tenants every test server has users for (docs/security.md "Tenants")."""
TEST_PASSWORDS = {name: f"{name}-test-password"
                  for name in ("client", "gateway", "stage", "scheduler", "admin", *TEST_TENANTS)}


def as_role(url: str, role: str | None) -> str:
    """``url`` (one or a comma-separated list, with or without credentials) as user ``role``;
    None: anonymous. Tests take it through the ``role_url`` fixture."""
    def one(u: str) -> str:
        scheme, _, rest = u.partition("://")
        host = rest.rpartition("@")[2]
        return f"{scheme}://{role}:{TEST_PASSWORDS[role]}@{host}" if role else f"{scheme}://{host}"
    return ",".join(one(u) for u in url.split(","))


@pytest.fixture(scope="session")
def role_url() -> Callable[[str, str | None], str]:
    return as_role


def _auth(directory: Path) -> ServerAuth:
    return write_server_auth(directory, TEST_PASSWORDS, TEST_TENANTS)


# Module scope: a server per test module keeps the suite fast; tests use fresh job ids and
# consume what they publish, so they do not see each other's work.


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port, directory = free_port(), tmp_path_factory.mktemp("nats")
    command = [binary("nats-server"), "-c", str(_auth(directory).nats), "-js", "-a", "127.0.0.1", "-p", str(port),
               "-sd", str(directory / "js")]
    with _server(command, port, "nats-server", directory / "nats.log"):
        yield as_role(f"nats://127.0.0.1:{port}", "stage")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _new_key(key: Path) -> list[str]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key)]


def _tls_server(directory: Path, tls: Tls, port: int) -> AbstractContextManager[subprocess.Popen]:
    config = directory / "tls.conf"
    config.write_text(nats_config(TEST_PASSWORDS, tls=tls, tenants=TEST_TENANTS))
    command = [binary("nats-server"), "-c", str(config), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(directory / "js")]
    return _server(command, port, "nats-server (TLS)", directory / "nats.log")


@pytest.fixture(scope="module")
def nats_tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A nats-server with the roles' users that speaks TLS only, with a self-signed certificate
    for 127.0.0.1: (the stage role's ``tls://`` URL, the certificate to trust)."""
    port, directory = free_port(), tmp_path_factory.mktemp("nats-tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    _openssl("req", "-x509", *_new_key(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1")
    with _tls_server(directory, Tls(cert_file=cert, key_file=key), port):
        yield as_role(f"tls://127.0.0.1:{port}", "stage"), cert


@dataclass
class PrivateCa:
    """A private CA with a server certificate for 127.0.0.1 and a client certificate, all PEM."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _private_ca(directory: Path) -> PrivateCa:
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    _openssl("req", "-x509", *_new_key(ca_key), "-out", str(ca), "-days", "1", "-subj", "/CN=disagfusion test CA")
    for name, subject, extension in (("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1"),
                                      ("client", "/CN=stage", "extendedKeyUsage=clientAuth")):
        key, request = directory / f"{name}.key", directory / f"{name}.csr"
        _openssl("req", *_new_key(key), "-out", str(request), "-subj", subject, "-addext", extension)
        _openssl("x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
                 "-copy_extensions", "copy", "-out", str(directory / f"{name}.pem"), "-days", "1")
    return PrivateCa(ca, directory / "server.pem", directory / "server.key", directory / "client.pem",
                  directory / "client.key")


@dataclass
class MutualTls:
    """A nats-server that asks every client for a certificate signed by its CA."""

    url: str
    """The stage role's ``tls://`` URL."""
    ca: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def nats_mtls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MutualTls]:
    port, directory = free_port(), tmp_path_factory.mktemp("nats-mtls")
    certs = _private_ca(directory)
    tls = Tls(cert_file=certs.server_cert, key_file=certs.server_key, ca_file=certs.ca, verify=True)
    with _tls_server(directory, tls, port):
        yield MutualTls(as_role(f"tls://127.0.0.1:{port}", "stage"), certs.ca, certs.client_cert, certs.client_key)


TLS_REDIS_SERVER = "DF_TEST_TLS_REDIS_SERVER"
"""A redis-server built with TLS (the wheel's is not): ``make test-tls`` sets it to Debian's."""


@dataclass
class TlsRedis:
    """A redis-server that speaks TLS only and asks every client for a certificate."""

    url: str
    """The stage role's ``rediss://`` URL."""
    port: int
    certs: PrivateCa


@pytest.fixture(scope="module")
def redis_tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    server = os.environ.get(TLS_REDIS_SERVER)
    if not server:
        pytest.skip(f"no TLS-capable redis-server: make test-tls sets {TLS_REDIS_SERVER}")
    port, directory = free_port(), tmp_path_factory.mktemp("redis-tls")
    certs = _private_ca(directory)
    command = [server, "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port), "--save", "",
               "--dir", str(directory), "--aclfile", str(_auth(directory).redis),
               "--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key),
               "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "yes"]
    with _server(command, port, "redis-server (TLS)", directory / "redis.log"):
        yield TlsRedis(as_role(f"rediss://127.0.0.1:{port}/0", "stage"), port, certs)


@dataclass
class NatsCluster:
    """Three clustered nats-servers with JetStream, each on its own loopback ports."""

    urls: list[str]
    nodes: dict[str, subprocess.Popen]
    """Server name (n0, n1, n2) -> its process."""

    @property
    def url(self) -> str:
        """The nodes as DF_NATS_URL takes them."""
        return ",".join(self.urls)

    def kill(self, server_name: str) -> None:
        """SIGKILL one node, as a crashed machine would leave it."""
        self.nodes[server_name].kill()
        self.nodes[server_name].wait()


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    directory = tmp_path_factory.mktemp("nats-cluster")
    auth = _auth(directory)
    client_ports, route_ports = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    routes = ",".join(f"nats://127.0.0.1:{port}" for port in route_ports)
    with ExitStack() as servers:
        nodes = {}
        for index, (port, route_port) in enumerate(zip(client_ports, route_ports)):
            name = f"n{index}"
            command = [binary("nats-server"), "-c", str(auth.nats), "-js", "-a", "127.0.0.1", "-p", str(port),
                       "-sd", str(directory / name),
                       "--server_name", name, "--cluster_name", "df", "--cluster", f"nats://127.0.0.1:{route_port}",
                       "--routes", routes]
            nodes[name] = servers.enter_context(_server(command, port, f"nats-server {name}", directory / f"{name}.log"))
        cluster = NatsCluster([as_role(f"nats://127.0.0.1:{port}", "stage") for port in client_ports], nodes)
        asyncio.run(_jetstream_ready(cluster.url))
        yield cluster


async def _jetstream_ready(url: str, timeout: float = 30.0) -> None:
    """Until the cluster has elected its JetStream meta leader, its API answers 503."""
    nc = await nats.connect(url.split(","))
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await nc.jetstream().account_info()
                return
            except (nats.js.errors.APIError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port, directory = free_port(), tmp_path_factory.mktemp("redis")
    command = [binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(directory),
               "--aclfile", str(_auth(directory).redis)]
    with _server(command, port, "redis-server", directory / "redis.log"):
        yield as_role(f"redis://127.0.0.1:{port}/0", "stage")


class RestartableRedis:
    """A redis-server of one test's own, which the test stops and starts again (on the same
    port, with an empty store) to play an outage."""

    def __init__(self, directory: Path):
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return as_role(f"redis://127.0.0.1:{self.port}/0", "stage")

    def start(self) -> None:
        command = [binary("redis-server"), "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                   "--dir", str(self.directory), "--aclfile", str(_auth(self.directory).redis)]
        with open(self.directory / "redis.log", "ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_port(self.port, self.proc, "redis-server")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


@pytest.fixture
async def nats_bus(nats_server: str) -> AsyncIterator[Bus]:
    """A stage user's connection to ``nats_server``, with the streams made."""
    connected = await connect(Settings(nats_url=nats_server), "test")
    yield connected
    await connected.close()


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread here and in every service a test starts (DF_TORCH_THREADS): the tiny
    models gain nothing from threads, spinning threads slow a shared CPU down, and a reference
    image computed here must use the thread count of the services it is compared with (float
    sums split over threads round differently)."""
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DF_TORCH_THREADS", "1")
        yield


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory holding the tiny preset, written once per test session; any other
    preset is written there on first use (``model_directory``), once per session too."""
    models_dir = tmp_path_factory.mktemp("models")
    model_directory("tiny", Settings(models_dir=models_dir))
    return models_dir


@pytest.fixture(scope="session")
def tiny_dir(tiny_models_dir: Path) -> Path:
    return tiny_models_dir / "tiny"


@pytest.fixture(scope="session")
def stock_pipeline(tiny_models_dir: Path) -> Callable[[str, str], tuple[DiffusersFamily, DiffusionPipeline]]:
    """Model ``name``'s family and its stock diffusers pipeline in ``dtype``, loaded with
    ``from_pretrained`` once per session."""

    @cache
    def pipeline(model: str, dtype: str = "float32") -> tuple[DiffusersFamily, DiffusionPipeline]:
        directory = model_directory(model, Settings(models_dir=tiny_models_dir))
        family = model_family(directory)
        pipe = family.pipeline_type().from_pretrained(directory, dtype=getattr(torch, dtype))
        pipe.set_progress_bar_config(disable=True)
        return family, pipe

    return pipeline


@pytest.fixture(scope="session")
def stock_image(stock_pipeline) -> Callable[[JobSpec, str], np.ndarray]:
    """The image the stock diffusers pipeline of ``spec.model``'s family makes for ``spec``
    in-process, loaded with ``from_pretrained``: what DisagFusion's split stages must reproduce."""

    def image(spec: JobSpec, dtype: str = "float32") -> np.ndarray:
        family, pipe = stock_pipeline(spec.model, dtype)
        return np.array(family.stock_call(pipe, spec).images[0])

    return image


@pytest.fixture(scope="session")
def stock_frames(stock_pipeline) -> Callable[[JobSpec, str], np.ndarray]:
    """The frames [F, H, W, 3] the stock pipeline of a video family makes for ``spec`` in-process,
    computed once per (spec, dtype) a session (the arrays are shared: do not write to them)."""

    @cache
    def frames(spec: JobSpec, dtype: str = "float32") -> np.ndarray:
        family, pipe = stock_pipeline(spec.model, dtype)
        return np.stack([np.array(frame) for frame in family.stock_call(pipe, spec).frames[0]])

    return frames
