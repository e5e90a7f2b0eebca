"""The project image's HEALTHCHECK follows the worker's heartbeat file, not the process: healthy
while the file is refreshed, unhealthy once it goes stale although the process still runs."""

from __future__ import annotations

import time
from datetime import timedelta

from python_on_whales import DockerClient

# Refreshes the heartbeat (as the stage worker does while connected) for a few seconds, then
# stays alive without it, like a worker that lost NATS.
HEARTBEAT_THEN_HANG = (
    "import time\n"
    "from disagfusion.health import health_path, write_health\n"
    "end = time.time() + 4\n"
    "while time.time() < end:\n"
    "    write_health(health_path()); time.sleep(1)\n"
    "time.sleep(600)\n"
)


def test_health_check_exits_1_without_heartbeat(project_image: str) -> None:
    output = DockerClient().run(
        project_image, ["sh", "-c", "python -m disagfusion.health 2>&1; echo exit=$?"], remove=True, networks=["none"]
    )
    assert "unhealthy" in output
    assert output.endswith("exit=1")


def wait_health(container, wanted: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        container.reload()
        status = container.state.health.status
        if status == wanted:
            break
        time.sleep(0.5)
    return status


def test_image_health_follows_heartbeat(project_image: str) -> None:
    docker = DockerClient()
    # The image's own check command, polled faster than its production interval.
    container = docker.run(
        project_image,
        ["python", "-c", HEARTBEAT_THEN_HANG],
        detach=True,
        networks=["none"],
        health_interval=timedelta(seconds=1),
        health_retries=1,
        health_start_period=timedelta(seconds=1),
    )
    try:
        assert wait_health(container, "healthy", timeout=20) == "healthy"
        assert wait_health(container, "unhealthy", timeout=40) == "unhealthy"
        container.reload()
        assert container.state.running  # the process lives on; only the health says it's not serving
    finally:
        container.remove(force=True, volumes=True)
