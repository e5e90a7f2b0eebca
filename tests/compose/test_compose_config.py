"""`docker compose config` (the real binary) accepts compose.yaml alone and with each override,
and the merged result says what the overrides promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from compose_support import GPU_OVERRIDE, HOSTNET_OVERRIDE, compose_client

STAGES = {"encoder", "dit", "decoder"}


@pytest.mark.parametrize(
    "overrides", [(), (GPU_OVERRIDE,), (HOSTNET_OVERRIDE,)], ids=["alone", "gpu", "hostnet"]
)
def test_config_accepts(overrides: tuple[Path, ...]) -> None:
    config = compose_client(*overrides).compose.config(return_json=True)
    assert set(config["services"]) == {"nats", "redis"} | STAGES
    for name in STAGES:
        service = config["services"][name]
        assert service["command"] == ["python", "-m", f"services.{name}"]
        assert service["depends_on"]["nats"]["condition"] == "service_healthy"
        mounts = {volume["target"]: volume["source"] for volume in service["volumes"]}
        # one tmpfs volume shared by all stages is what makes shm tensor handoff work
        assert mounts["/dev/shm/disagfusion"] == "shm"
        assert mounts["/var/lib/disagfusion/models"] == "models"
    assert config["volumes"]["shm"]["driver_opts"]["type"] == "tmpfs"


def test_bridge_network_by_default() -> None:
    config = compose_client().compose.config(return_json=True)
    assert config["services"]["dit"]["environment"]["DF_NATS_URL"] == "nats://nats:4222"
    assert "network_mode" not in config["services"]["dit"]


def test_hostnet_uses_loopback_and_creates_no_network() -> None:
    config = compose_client(HOSTNET_OVERRIDE).compose.config(return_json=True)
    for name, service in config["services"].items():
        assert service["network_mode"] == "host", name
        assert not service.get("ports"), name
        assert not service.get("networks"), name
    for name in STAGES:
        env = config["services"][name]["environment"]
        assert env["DF_NATS_URL"].startswith("nats://127.0.0.1:"), name
        assert env["DF_REDIS_URL"].startswith("redis://127.0.0.1:"), name
        assert env["DF_MODELS"] == "tiny,small"  # the base file's settings survive the merge
    assert "-a" in config["services"]["nats"]["command"]
    assert "127.0.0.1" in config["services"]["redis"]["command"]


def test_gpu_reserves_devices_per_stage(tmp_path: Path) -> None:
    env_file = tmp_path / "gpus.env"
    env_file.write_text("DF_DIT_GPUS=1,2,3\nDF_ENCODER_GPUS=0\nDF_DECODER_GPUS=0\n")
    config = compose_client(GPU_OVERRIDE, env_file=env_file).compose.config(return_json=True)
    for name, gpus in {"dit": "1,2,3", "encoder": "0", "decoder": "0"}.items():
        service = config["services"][name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["device_ids"] == [gpus], name
        assert service["environment"]["DF_DEVICE"] == "cuda"
        assert service["ipc"] == "host"
    assert "deploy" not in config["services"]["nats"]
