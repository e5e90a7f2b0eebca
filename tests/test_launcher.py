"""The launcher's view of the processes it manages."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from disagfusion.auth import ROLES
from disagfusion.credentials import stack_credentials
from disagfusion.launcher import Launcher, alive, load_services

# A parent that starts one child, prints its pid and never reaps it.
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(float(sys.argv[1]))", sys.argv[1]])
print(child.pid, flush=True)
time.sleep(60)
"""


def _grandchild(lives_s: float) -> tuple[subprocess.Popen, int]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(lives_s)], stdout=subprocess.PIPE, text=True)
    return parent, int(parent.stdout.readline())


def test_an_exited_process_another_parent_has_not_reaped_is_gone() -> None:
    """The scheduler drains stage processes that the process which ran `up` started; one that
    exited stays a zombie until that parent reaps it and must not count as still draining."""
    parent, pid = _grandchild(0.0)
    running_parent, running_pid = _grandchild(60.0)
    try:
        deadline = time.monotonic() + 20
        while alive(pid):
            assert time.monotonic() < deadline, f"pid {pid} exited but still counts as alive"
            time.sleep(0.05)
        assert alive(running_pid)
    finally:
        for p in (parent, running_parent):
            p.kill()
            p.wait()


def test_the_transport_set_for_up_reaches_the_stage_services(monkeypatch) -> None:
    """compose.yaml says ${DF_TRANSPORT:-shm}: `DF_TRANSPORT=redis disagfusion up` is not ignored."""
    from disagfusion.launcher import load_services

    assert {s.environment["DF_TRANSPORT"] for s in load_services().values()} == {"shm"}
    monkeypatch.setenv("DF_TRANSPORT", "redis")
    services = load_services()
    assert {services[name].environment["DF_TRANSPORT"] for name in ("encoder", "dit", "decoder")} == {"redis"}
    assert {services[name].restart for name in ("encoder", "dit", "decoder")} == {"unless-stopped"}


def test_the_embedded_redis_keeps_its_data_through_a_crash(tmp_path) -> None:
    """Append-only, synced every second: a key written more than a second before a SIGKILL is
    there after the restart (tensor blobs survive a Redis restart)."""
    import redis

    from disagfusion.launcher import free_port, redis_command, wait_port, write_server_auth

    port, passwords = free_port(), stack_credentials(tmp_path, ROLES)
    command = redis_command(port, tmp_path, write_server_auth(tmp_path, passwords).redis)
    url = f"redis://stage:{passwords['stage']}@127.0.0.1:{port}/0"
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, server, "redis-server")
        redis.Redis.from_url(url).set("df:blob:kept", b"\x00tensor bytes")
        time.sleep(1.5)
        server.kill()
        server.wait()
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, server, "redis-server")
        deadline = time.monotonic() + 10
        while True:
            try:
                assert redis.Redis.from_url(url).get("df:blob:kept") == b"\x00tensor bytes"
                break
            except redis.exceptions.BusyLoadingError:  # replaying the file
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        server.kill()
        server.wait()


def test_the_default_stack_runs_the_stages_and_the_monolithic_one_the_pipeline_instead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("COMPOSE_PROFILES", raising=False)
    assert set(load_services()) == {"encoder", "dit", "decoder", "gateway"}
    assert set(load_services(monolithic=True)) == {"pipeline", "gateway"}  # the gateway fronts either
    # The compose profile alone swaps them too: the pipeline never shares the encoder's queue.
    monkeypatch.setenv("COMPOSE_PROFILES", "monolithic,scheduler")
    assert set(load_services()) == {"pipeline", "scheduler", "gateway"}


def test_a_tenant_added_later_keeps_every_password_and_a_role_name_is_no_tenant(tmp_path) -> None:
    before = stack_credentials(tmp_path, ROLES)
    after = stack_credentials(tmp_path, [*ROLES, "acme"])
    assert {role: after[role] for role in ROLES} == before and len(after["acme"]) == 32
    with pytest.raises(ValueError, match="is a role's user"):
        Launcher(tmp_path / "stack").up(tenants=["client"])
    with pytest.raises(ValueError, match="not a tenant name"):
        Launcher(tmp_path / "stack").up(tenants=["Acme Corp"])
