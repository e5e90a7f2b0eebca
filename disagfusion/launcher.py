"""The embedded stack: nats-server, redis-server and the services of compose.yaml as local processes.

compose.yaml is the one description of a deployment. The launcher reads each service's
``command`` and ``environment`` from it and runs them here, changing only what differs
between a container and this host: the interpreter, the NATS/Redis addresses, and the paths
of the model cache, shared memory and health files. So every test run exercises the same
file that ``docker compose up`` uses.

The processes outlive the command that started them (``disagfusion up`` returns at once);
their ids, ports and logs are kept in the data directory, which ``down`` and ``scale`` read.
A supervisor process (``disagfusion.supervisor``) restarts the ones that die, as each
service's compose ``restart`` policy says.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from pydantic import BaseModel

from disagfusion.auth import ROLES, check_tenant_name, nats_config, redis_acl, service_role
from disagfusion.config import Settings, comma_list
from disagfusion.credentials import stack_credentials, write_private
from disagfusion.errors import DisagFusionError
from disagfusion.health import health_age
from disagfusion.protocol import STAGE_SERVICES

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "compose.yaml"
INFRASTRUCTURE = ("nats", "redis")
"""Compose services the launcher runs itself, from the binaries of the pip packages."""
MONOLITHIC = "monolithic"
"""The compose profile of the pipeline service, which runs every stage in one process instead of
the stage services."""

_STATE_LOCK = threading.Lock()
"""Serialises read-change-save of stack.json among threads (the scheduler scales services from
several); a file lock does it among processes (the CLI, the scheduler, the supervisor)."""
RESTART_POLICIES = ("no", "always", "on-failure", "unless-stopped")

_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


class ServiceSpec(BaseModel):
    name: str
    command: list[str]
    environment: dict[str, str]
    replicas: int = 1
    restart: str = "no"
    """compose's restart policy: no, always, on-failure or unless-stopped."""


class Proc(BaseModel):
    pid: int
    log: Path
    health_file: Path | None = None
    url: str | None = None
    """Where a service that serves HTTP (the gateway) answers."""
    metrics_url: str | None = None
    """Where its Prometheus metrics are scraped (docs/metrics.md)."""
    command: list[str] = []
    """What started it (nats and redis: the supervisor restarts them with it)."""
    restarts: int = 0
    """How often the supervisor restarted this replica."""
    crashes: list[float] = []
    """When it died lately (unix seconds), for the supervisor's backoff and give-up rule."""
    restart_at: float | None = None
    """Dead, and due to be restarted at this time."""
    gave_up: str | None = None
    """Dead, and not restarted any more: why."""


class StackState(BaseModel):
    data_dir: Path
    nats_url: str
    redis_url: str
    nats: Proc
    redis: Proc
    monolithic: bool = False
    tenants: list[str] = []
    """The tenants' NATS users this stack runs with (``disagfusion up --tenant``); their
    passwords are in ``credentials.json`` under their names."""
    services: dict[str, list[Proc]] = {}
    supervisor: Proc | None = None

    @property
    def gateway_url(self) -> str | None:
        """The URL of the first gateway process, if the stack runs one."""
        return next((p.url for p in self.services.get("gateway", []) if p.url), None)

    @property
    def given_up(self) -> dict[str, list[str]]:
        """Why the supervisor stopped restarting a process, by service (nats and redis included),
        for every service with such a replica: ``disagfusion status`` shows it."""
        procs = {"nats": [self.nats], "redis": [self.redis], **self.services}
        reasons = {name: [p.gave_up for p in found if p.gave_up] for name, found in procs.items()}
        return {name: found for name, found in reasons.items() if found}

    @property
    def metrics_urls(self) -> dict[str, list[str]]:
        """The metrics endpoint of every service process that has one, by service."""
        urls = {name: [p.metrics_url for p in procs if p.metrics_url] for name, procs in self.services.items()}
        return {name: found for name, found in urls.items() if found}


class LauncherError(DisagFusionError, RuntimeError):
    """The embedded stack could not do what was asked (start, scale, find its state)."""


def interpolate(value: str, environ: dict[str, str] | os._Environ = os.environ) -> str:
    """Resolve compose's ``${VAR}`` and ``${VAR:-default}`` the way docker compose does."""
    return _VARIABLE.sub(lambda m: environ.get(m.group(1)) or (m.group(2) or ""), value)


def active_profiles() -> set[str]:
    """Compose profiles switched on, read from COMPOSE_PROFILES as docker compose reads it."""
    return set(comma_list(os.environ.get("COMPOSE_PROFILES", "")))


def load_services(compose_file: Path = COMPOSE_FILE, monolithic: bool = False) -> dict[str, ServiceSpec]:
    """The application services of a compose file (everything but nats and redis), leaving out
    services of profiles that are not active, as docker compose does. ``monolithic`` (or the
    ``monolithic`` profile) swaps the stage services for the pipeline service: both would take
    jobs from the encoder's queue."""
    doc = yaml.safe_load(compose_file.read_text())
    profiles = active_profiles() | ({MONOLITHIC} if monolithic else set())
    services = {}
    for name, svc in doc["services"].items():
        if name in INFRASTRUCTURE or (svc.get("profiles") and not profiles & set(svc["profiles"])):
            continue
        if MONOLITHIC in profiles and name in STAGE_SERVICES:
            continue
        env = svc.get("environment") or {}
        if isinstance(env, list):  # compose also allows ["KEY=value", ...]
            env = dict(item.split("=", 1) for item in env)
        services[name] = ServiceSpec(
            name=name,
            command=[interpolate(str(part)) for part in svc["command"]],
            environment={k: interpolate(str(v)) for k, v in env.items() if v is not None},
            replicas=(svc.get("deploy") or {}).get("replicas", 1),
            restart=svc.get("restart", "no"),
        )
    return services


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_or_free(port: int) -> int:
    """``port`` if nothing listens on it here, else (or for 0) a free one: a second stack, or
    a test's, gets a port of its own instead of failing to start."""
    if port:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                pass
    return free_port()


def binary(name: str) -> str:
    """Binaries shipped by pip packages live next to this interpreter."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise LauncherError(f"{name} not found: install the project (pip install -e .) to get it")
    return found


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        # Another process's child, e.g. the scheduler draining a stage the long-lived process
        # that ran `up` started: it has exited once it is a zombie its parent has not reaped.
        return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (macOS): take it for alive, as kill(0) said
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # the state follows the parenthesised name


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LauncherError(f"{what} exited at start (code {proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise LauncherError(f"{what} did not open port {port} within {timeout:.0f} s")


class Launcher:
    """``monolithic``: run the pipeline service instead of the stage services; None: as the
    stack running from ``data_dir`` does (no stack: not)."""

    def __init__(self, data_dir: Path, compose_file: Path = COMPOSE_FILE, models_dir: Path | None = None,
                 gateway_port: int = 0, monolithic: bool | None = None):
        self.data_dir = data_dir.resolve()
        self.compose_file = compose_file
        self.models_dir = models_dir
        # The gateway's port when free (``disagfusion up`` asks for 8000); 0 or a taken one: any
        # free port, so stacks started side by side (tests) never race for one.
        self.gateway_port = gateway_port
        self.state_file = self.data_dir / "stack.json"
        self.logs = self.data_dir / "logs"
        if monolithic is None:
            state = self.state()
            monolithic = state is not None and state.monolithic
        self.monolithic = monolithic or MONOLITHIC in active_profiles()
        self.services = load_services(compose_file, monolithic)

    # ----------------------------------------------------------------- state

    def state(self) -> StackState | None:
        if not self.state_file.exists():
            return None
        return StackState.model_validate_json(self.state_file.read_text())

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold while reading, changing and saving the state."""
        with _STATE_LOCK:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            with open(self.data_dir / "stack.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                yield

    def save(self, state: StackState) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(state.model_dump_json(indent=2))
        tmp.replace(self.state_file)

    def client_settings(self, tenant: str = "") -> Settings:
        """Settings for a client of the running stack (its NATS and Redis addresses): the
        admin's, or ``tenant``'s (no Redis: clients never touch it)."""
        state = self.state()
        if state is None:
            raise LauncherError(f"no stack is running from {self.data_dir} (disagfusion up starts one)")
        passwords = stack_credentials(self.data_dir, ROLES)
        if tenant:
            if tenant not in state.tenants:
                raise LauncherError(f"the stack has no tenant {tenant!r} (tenants: {', '.join(state.tenants) or 'none'}; "
                                    "disagfusion up --tenant NAME adds one)")
            return Settings(nats_url=state.nats_url, tenant=tenant, nats_password=passwords[tenant])
        return Settings(nats_url=state.nats_url, redis_url=state.redis_url, nats_user="admin",
                        nats_password=passwords["admin"], redis_user="admin", redis_password=passwords["admin"])

    def running(self) -> dict[str, int]:
        state = self.state()
        if state is None:
            return {}
        return {name: sum(alive(p.pid) for p in procs) for name, procs in state.services.items()}

    # ----------------------------------------------------------------- up / down

    def up(self, scales: dict[str, int] | None = None, wait: bool = True, timeout: float = 120.0,
           tenants: Iterable[str] = ()) -> StackState:
        """Start the stack; ``tenants``: a NATS user per tenant besides the roles' (docs/security.md)."""
        tenants = [check_tenant_name(t) for t in dict.fromkeys(tenants)]
        state = self.state()
        if state is not None and alive(state.nats.pid):
            raise LauncherError(f"a stack is already running from {self.data_dir} (disagfusion down stops it)")
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)  # credentials, logs and the servers' data: this user's only
        auth = write_server_auth(self.data_dir, stack_credentials(self.data_dir, [*ROLES, *tenants]), tenants)
        nats_port, redis_port = free_port(), free_port()
        nats = self._spawn(
            "nats",
            [binary("nats-server"), "-c", str(auth.nats), "-js", "-a", "127.0.0.1", "-p", str(nats_port),
             "-sd", str(self.data_dir / "nats")],
        )
        redis = self._spawn("redis", redis_command(redis_port, self.data_dir, auth.redis))
        wait_port(nats_port, nats[1], "nats-server")
        wait_port(redis_port, redis[1], "redis-server")
        state = StackState(
            data_dir=self.data_dir,
            nats_url=f"nats://127.0.0.1:{nats_port}",
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            nats=nats[0],
            redis=redis[0],
            monolithic=self.monolithic,
            tenants=tenants,
        )
        self.save(state)
        scales = scales or {}
        for name, spec in self.services.items():
            self.scale(name, scales.get(name, spec.replicas), wait=False)
        self._start_supervisor()
        if wait:
            self.wait_healthy(timeout)
        return self.state()

    def _start_supervisor(self) -> None:
        command = [sys.executable, "-m", "disagfusion.supervisor", str(self.data_dir),
                   "--compose-file", str(self.compose_file)]
        if self.models_dir is not None:
            command += ["--models-dir", str(self.models_dir)]
        supervisor, _ = self._spawn("supervisor", command, {**os.environ, "PYTHONUNBUFFERED": "1"})
        with self.locked():
            state = self.state()
            state.supervisor = supervisor
            self.save(state)

    def down(self, timeout: float = 60.0) -> None:
        """Drain and stop the services, then stop NATS and Redis."""
        state = self.state()
        if state is None:
            return
        if state.supervisor is not None:  # first, or it would restart what is stopped
            _terminate([state.supervisor.pid], 10.0)
        procs = [p for ps in state.services.values() for p in ps]
        _terminate([p.pid for p in procs], timeout)
        _terminate([state.redis.pid, state.nats.pid], 10.0)
        shutil.rmtree(self._own_shm_dir(), ignore_errors=True)  # with every worker gone, no blob is needed
        self.state_file.unlink()

    # ----------------------------------------------------------------- scaling

    def scale(self, service: str, replicas: int, wait: bool = True, timeout: float = 120.0) -> None:
        """Start or drain processes until ``service`` has ``replicas`` live ones, whatever state
        its replicas are in: dead ones (awaiting a restart, or given up) are replaced.

        Scaling down sends SIGTERM to the newest processes and waits for them to drain."""
        if service not in self.services:
            raise LauncherError(f"unknown service {service!r}; compose.yaml has {sorted(self.services)}")
        with self.locked():
            state = self.state()
            if state is None:
                raise LauncherError("no stack is running (disagfusion up starts one)")
            procs = [p for p in state.services.get(service, []) if alive(p.pid)]
            while len(procs) < replicas:
                procs.append(self._spawn_service(state, service, len(procs)))
            extra, procs = procs[replicas:], procs[:replicas]
            state.services[service] = procs
            self.save(state)
        _terminate([p.pid for p in extra], timeout=self._drain_timeout(service) + 10.0)
        if wait:
            self.wait_healthy(timeout, [service])

    def _drain_timeout(self, service: str) -> float:
        return float(self.services[service].environment.get("DF_DRAIN_TIMEOUT_S", 60.0))

    def wait_healthy(self, timeout: float = 120.0, services: list[str] | None = None) -> None:
        """Wait until every process of ``services`` (all when None) reports itself connected and
        consuming. A dead one the supervisor is about to restart is waited for; one it gave up
        on (or that no policy restarts) fails the wait."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            pending = []
            for name, procs in state.services.items():
                if services is not None and name not in services:
                    continue
                for proc in procs:
                    if not alive(proc.pid):
                        if proc.gave_up or self.services[name].restart == "no" or state.supervisor is None:
                            raise LauncherError(f"{name} (pid {proc.pid}) exited; see {proc.log}")
                        pending.append(f"{name} (restarting)")
                    elif health_age(proc.health_file) is None:
                        pending.append(f"{name} (pid {proc.pid})")
            if not pending:
                return
            if time.monotonic() > deadline:
                raise LauncherError(f"not healthy after {timeout:.0f} s: {', '.join(pending)}")
            time.sleep(0.1)

    # ----------------------------------------------------------------- processes

    def environment(self, state: StackState, service: str) -> dict[str, str]:
        """The service's compose environment, with container addresses and paths made local."""
        env = {**os.environ, **self.services[service].environment}
        env["DF_NATS_URL"] = state.nats_url
        env["DF_REDIS_URL"] = state.redis_url
        role, passwords = service_role(service), stack_credentials(self.data_dir, ROLES)
        env.update(DF_NATS_USER=role, DF_NATS_PASSWORD=passwords[role])
        for secret_file in ("DF_NATS_PASSWORD_FILE", "DF_REDIS_PASSWORD_FILE"):
            env.pop(secret_file, None)  # the stack's own passwords, not a file the shell names
        if role == "stage":  # the only role with a Redis user
            env.update(DF_REDIS_USER=role, DF_REDIS_PASSWORD=passwords[role])
        env["DF_STACK_DIR"] = str(self.data_dir)  # so a service (the scheduler) can scale this stack
        env["DF_SHM_DIR"] = os.environ.get("DF_SHM_DIR", str(self._own_shm_dir()))
        if self.models_dir is not None:
            env["DF_MODELS_DIR"] = str(self.models_dir)
        elif "DF_MODELS_DIR" in os.environ:
            env["DF_MODELS_DIR"] = os.environ["DF_MODELS_DIR"]
        else:
            env.pop("DF_MODELS_DIR", None)  # the container path means nothing here: use the default
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _own_shm_dir(self) -> Path:
        """Tensor handoff files of this stack, unless DF_SHM_DIR names a directory to use:
        one per data directory, so stacks side by side never share blobs."""
        stack_id = hashlib.sha1(str(self.data_dir).encode()).hexdigest()[:10]
        return Path(f"/dev/shm/disagfusion-{stack_id}")

    def respawn(self, state: StackState, service: str, index: int) -> Proc:
        """A new process for a dead replica (the supervisor's restart)."""
        return self._spawn_service(state, service, index)

    def _spawn_service(self, state: StackState, service: str, index: int) -> Proc:
        command = list(self.services[service].command)
        if command[0] in ("python", "python3"):
            command[0] = sys.executable
        env = self.environment(state, service)
        health = self.data_dir / "health" / f"{service}-{time.time_ns()}"
        health.parent.mkdir(parents=True, exist_ok=True)
        env["DF_HEALTH_FILE"] = str(health)
        url = metrics_url = None
        declared = self.services[service].environment  # compose's, not a DF_* the shell exported
        if "DF_GATEWAY_PORT" in declared:  # serves HTTP: on loopback only, at a port free here
            port = port_or_free(self.gateway_port)
            env["DF_GATEWAY_HOST"], env["DF_GATEWAY_PORT"] = "127.0.0.1", str(port)
            url = f"http://127.0.0.1:{port}"
            metrics_url = f"{url}/metrics"  # on its own HTTP port
        elif int(declared.get("DF_METRICS_PORT") or 0):  # a port of its own: replicas share this host
            port = free_port()
            env["DF_METRICS_HOST"], env["DF_METRICS_PORT"] = "127.0.0.1", str(port)
            metrics_url = f"http://127.0.0.1:{port}/metrics"
        proc, _ = self._spawn(f"{service}-{index}", command, env)
        return proc.model_copy(update={"health_file": health, "url": url, "metrics_url": metrics_url})

    def _spawn(self, label: str, command: list[str], env: dict[str, str] | None = None) -> tuple[Proc, subprocess.Popen]:
        log = self.logs / f"{label}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.compose_file.parent,
                start_new_session=True,  # outlives `disagfusion up`, and Ctrl-C in its terminal
            )
        return Proc(pid=popen.pid, log=log, command=command), popen


class ServerAuth(BaseModel):
    nats: Path
    """The nats-server config holding the users and their permissions."""
    redis: Path
    """The Redis ACL file."""


def write_server_auth(directory: Path, passwords: dict[str, str], tenants: Iterable[str] = ()) -> ServerAuth:
    """The users of every role and tenant (disagfusion.auth) as nats-server and redis-server
    read them, written into ``directory``, readable by this user only."""
    auth = ServerAuth(nats=directory / "nats-auth.conf", redis=directory / "redis-users.acl")
    write_private(auth.nats, nats_config(passwords, tenants=tenants))
    write_private(auth.redis, "\n".join(redis_acl(passwords)) + "\n")
    return auth


def redis_command(port: int, directory: Path, acl_file: Path) -> list[str]:
    """The embedded redis-server. Persistent, as in compose.yaml: tensors handed between stages
    are the only copy of a job's progress once the producer acked its input, so a Redis restart
    must not lose them. The append-only file is synced every second (a crash loses at most the
    last second's writes); RDB snapshots stay off. Its users come from ``acl_file``; the default
    user is off."""
    return [binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(directory), "--aclfile", str(acl_file)]


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM a child, wait for a clean exit, SIGKILL it if it does not come."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _terminate(pids: list[int], timeout: float) -> None:
    """SIGTERM, wait for a clean exit (services drain), SIGKILL what is left."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
