"""The embedded stack's supervisor, with real processes: nats-server, redis-server and small
services from a compose file of the test's own (one that lives and reports health, one that
crashes at once)."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from typer.testing import CliRunner

from disagfusion.launcher import Launcher, StackState, alive
from disagfusion_cli import app
from disagfusion.supervisor import RestartRule, restarts

HEALTHY = (
    "import os, pathlib, time\n"
    "path = pathlib.Path(os.environ['DF_HEALTH_FILE'])\n"
    "while True:\n"
    "    path.write_text('serving')\n"
    "    time.sleep(0.5)\n"
)


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Launcher]:
    monkeypatch.setenv("DF_RESTART_DELAY_S", "0.2")
    monkeypatch.setenv("DF_RESTART_MAX_CRASHES", "3")
    compose = tmp_path / "compose.yaml"
    compose.write_text(yaml.safe_dump({"services": {
        "worker": {"command": ["python", "-c", HEALTHY], "restart": "unless-stopped"},
        "crasher": {"command": ["python", "-c", "import sys; sys.exit(3)"], "restart": "unless-stopped"},
        "oneshot": {"command": ["python", "-c", "pass"]},  # compose's default policy: no
    }}))
    launcher = Launcher(tmp_path / "stack", compose_file=compose)
    launcher.up(wait=False)
    try:
        yield launcher
    finally:
        launcher.down(timeout=10)


def wait_for(check: Callable[[StackState], object], what: str, timeout: float = 20.0, launcher: Launcher = None):
    deadline = time.monotonic() + timeout
    while True:
        found = check(launcher.state())
        if found:
            return found
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.1)


def test_a_killed_service_comes_back_on_its_own(stack: Launcher) -> None:
    stack.wait_healthy(20, ["worker"])
    [first] = stack.state().services["worker"]
    os.kill(first.pid, signal.SIGKILL)
    back = wait_for(lambda s: s.services["worker"][0].pid != first.pid and s.services["worker"][0], "restart",
                    launcher=stack)
    assert alive(back.pid) and back.restarts == 1
    stack.wait_healthy(20, ["worker"])


def test_a_service_that_keeps_crashing_is_given_up_loudly_and_scale_replaces_it(stack: Launcher) -> None:
    gave_up = wait_for(lambda s: s.services["crasher"][0].gave_up, "give-up", launcher=stack)
    assert "crashed 3 times within 60 s" in gave_up
    log = (stack.logs / "supervisor.log").read_text()
    assert "GIVING UP on crasher (replica 0)" in log
    assert stack.state().given_up == {"crasher": [gave_up]}
    shown = CliRunner().invoke(app, ["status", "--data-dir", str(stack.data_dir)])
    assert shown.exit_code == 0, shown.output
    assert "".join(f"crasher: given up: {gave_up}".split()) in "".join(shown.output.split())  # however rich wraps
    [oneshot] = stack.state().services["oneshot"]
    assert not alive(oneshot.pid) and oneshot.restarts == 0  # policy "no": left dead
    # Dead and given-up replicas elsewhere do not fail a scale of this service.
    stack.scale("worker", 2)
    stack.scale("worker", 1)
    dead = stack.state().services["crasher"][0].pid
    stack.scale("crasher", 1, wait=False)  # a fresh one, with a fresh crash budget
    fresh = stack.state().services["crasher"][0]
    assert fresh.pid != dead and fresh.gave_up is None


def test_nats_killed_comes_back_on_its_port(stack: Launcher) -> None:
    state = stack.state()
    port = int(state.nats_url.rsplit(":", 1)[1])
    os.kill(state.nats.pid, signal.SIGKILL)
    wait_for(lambda s: s.nats.pid != state.nats.pid and alive(s.nats.pid), "nats restart", launcher=stack)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "nats-server did not come back on its port"
            time.sleep(0.1)


def test_restart_rule() -> None:
    rule = RestartRule(first_delay_s=1.0, most_delay_s=30.0, max_crashes=5, window_s=60.0)
    assert [rule.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert rule.recent([0.0, 50.0, 100.0], now=120.0) == [100.0]
    assert [restarts(p) for p in ("no", "always", "on-failure", "unless-stopped")] == [False, True, True, True]
