"""`docker compose config` (the real binary) accepts compose.yaml alone and with each override,
and the merged result says what the overrides promise."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from compose_support import (
    COMPOSE_FILE, GPU_OVERRIDE, HOSTNET_OVERRIDE, JOIN_OVERRIDE, ROOT, SCHEDULER_OVERRIDE, compose_client,
)

STAGES = {"encoder", "dit", "decoder"}


@pytest.mark.parametrize(
    "overrides", [(), (GPU_OVERRIDE,), (HOSTNET_OVERRIDE,)], ids=["alone", "gpu", "hostnet"]
)
def test_config_accepts(overrides: tuple[Path, ...]) -> None:
    config = compose_client(*overrides).compose.config(return_json=True)
    assert set(config["services"]) == {"nats", "redis", "gateway"} | STAGES
    for name in STAGES:
        service = config["services"][name]
        assert service["command"] == ["python", "-m", f"services.{name}"]
        assert service["depends_on"]["nats"]["condition"] == "service_healthy"
        mounts = {volume["target"]: volume["source"] for volume in service["volumes"]}
        # one tmpfs volume shared by all stages is what makes shm tensor handoff work
        assert mounts["/dev/shm/disagfusion"] == "shm"
        assert mounts["/var/lib/disagfusion/models"] == "models"
    assert config["volumes"]["shm"]["driver_opts"]["type"] == "tmpfs"


def test_nats_cluster_override_keeps_every_stream_on_three_nodes() -> None:
    config = compose_client(ROOT / "deploy/compose.nats-cluster.yaml").compose.config(return_json=True)
    nodes = ["nats", "nats-2", "nats-3"]
    assert set(config["services"]) == {"redis", "gateway", *nodes} | STAGES
    routes = {config["services"][node]["command"][-1] for node in nodes}
    assert routes == {",".join(f"nats://{node}:6222" for node in nodes)}
    for name in STAGES | {"gateway"}:
        environment = config["services"][name]["environment"]
        assert environment["DF_NATS_URL"].split(",") == [f"nats://{node}:4222" for node in nodes]
        assert environment["DF_STREAM_REPLICAS"] == "3"
        assert environment["DF_MODELS"] == "tiny,small"  # the base environment is kept


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


def test_gateway_is_published_on_loopback_and_checks_its_health() -> None:
    gateway = compose_client().compose.config(return_json=True)["services"]["gateway"]
    assert gateway["command"] == ["python", "-m", "services.gateway"]
    [port] = gateway["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "8000", 8000)
    assert "/healthz" in " ".join(gateway["healthcheck"]["test"])
    hostnet = compose_client(HOSTNET_OVERRIDE).compose.config(return_json=True)["services"]["gateway"]
    assert hostnet["environment"]["DF_GATEWAY_HOST"] == "127.0.0.1"
    assert hostnet["environment"]["DF_NATS_URL"].startswith("nats://127.0.0.1:")


def test_each_service_scans_for_its_metrics_port_in_a_range_of_its_own() -> None:
    """docs/metrics.md: a replica takes the first free port of its service's range
    (DF_METRICS_PORT and the DF_METRICS_PORT_SPAN = 100 above it), so the ranges must not
    overlap; on the host network the endpoints bind loopback only."""
    profiles = ["monolithic", "engram", "scheduler"]
    services = compose_client(profiles=profiles).compose.config(return_json=True)["services"]
    ports = {name: int(s["environment"]["DF_METRICS_PORT"]) for name, s in services.items()
             if "DF_METRICS_PORT" in (s.get("environment") or {})}
    assert set(ports) == STAGES | {"pipeline", "engram_store", "scheduler"}
    starts = sorted(ports.values())
    assert all(b - a >= 100 for a, b in zip(starts, starts[1:])), ports
    assert {services[name]["environment"]["DF_METRICS_HOST"] for name in ports} == {"0.0.0.0"}
    hostnet = compose_client(HOSTNET_OVERRIDE, profiles=profiles).compose.config(return_json=True)["services"]
    for name in ports.keys() - {"pipeline"}:  # the override leaves the monolithic baseline as it is
        assert hostnet[name]["environment"]["DF_METRICS_HOST"] == "127.0.0.1", name


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


# Every variable the compose files interpolate, each set to a value of its own. The scheduler's
# own (DF_SCHED_*, DF_DOCKER_*) and compose's COMPOSE_PROJECT_NAME configure only the scheduler.
VARIABLES = {
    "DF_IMAGE": "img:1", "DF_BASE_IMAGE": "base:2", "DF_DOCKER_CLI_IMAGE": "cli:3", "DF_NATS_IMAGE": "nats:4",
    "DF_REDIS_IMAGE": "redis:5", "DF_NATS_PUBLISH": "127.0.0.1:14400", "DF_REDIS_MAXMEMORY": "3gb",
    "DF_SHM_SIZE": "5g", "DF_MODELS": "tiny", "DF_DEVICE": "cuda:1", "DF_DTYPE": "bfloat16", "DF_ACK_WAIT_S": "7",
    "DF_TORCH_THREADS": "3",
    "DF_ENGRAM_ARENA": "nats:default", "DF_ENGRAM_REPLY": "shm", "DF_ENGRAM_ARENAS": "a,b",
    "DF_ENGRAM_SCRATCH_DIR": "/dev/shm/scratch", "DF_NATS_PORT": "14401", "DF_NATS_MONITOR_PORT": "14402",
    "DF_REDIS_PORT": "14403", "DF_GPU_IMAGE": "gpu:6", "DF_CUDA_BASE_IMAGE": "cuda:7",
    "DF_GPU_USE_WHEELHOUSE": "auto", "DF_ENCODER_GPUS": "0", "DF_DIT_GPUS": "1,2", "DF_DECODER_GPUS": "3",
    "DF_VARIANT": "fp16", "DF_VAE_TILING": "true", "DF_VAE_TILE_SIZE": "256", "DF_TRANSPORT": "redis",
    "DF_GATEWAY_PORT": "18000", "DF_GATEWAY_PUBLISH": "127.0.0.1:18001", "DF_API_KEYS": "k1,k2",
    "DF_GATEWAY_MAX_BACKLOG": "50", "DF_ENV": "production",
    "DF_CHECKPOINT_EVERY": "5", "DF_CHECKPOINT_MIN_STEPS": "12", "DF_PREEMPT_MIN_STEPS": "4",
    "DF_JOIN_NATS_URL": "nats://10.0.0.1:4222",
    "DF_JOIN_REDIS_URL": "redis://10.0.0.1:6379/0", "DF_REDIS_PUBLISH": "0.0.0.0:16379",
    "DF_NATS_CLUSTER_PORT": "14404", "DF_NATS_2_PORT": "14405", "DF_NATS_2_MONITOR_PORT": "14406",
    "DF_NATS_2_CLUSTER_PORT": "14407", "DF_NATS_3_PORT": "14408", "DF_NATS_3_MONITOR_PORT": "14409",
    "DF_NATS_3_CLUSTER_PORT": "14410",
    **{f"DF_NATS_{role}_PASSWORD": f"nats-{role.lower()}-secret-0123456789" for role in ("CLIENT", "GATEWAY", "STAGE", "SCHEDULER", "ADMIN")},
    **{f"DF_REDIS_{role}_PASSWORD": f"redis-{role.lower()}-secret-0123456789" for role in ("STAGE", "ADMIN")},
}
SCHEDULER_ONLY = {"COMPOSE_PROJECT_NAME", "DF_DOCKER_GID", "DF_DOCKER_SOCKET"}


def interpolated(path: Path) -> set[str]:
    """Variables a compose file interpolates (its comments left out: they show examples)."""
    text = re.sub(r"(?m)(^|\s)#.*$", "", path.read_text())
    return set(re.findall(r"\$\{(\w+)", text))


def test_every_variable_is_covered() -> None:
    found = set().union(*(interpolated(path) for path in [COMPOSE_FILE, *ROOT.glob("deploy/compose.*.yaml")]))
    assert {v for v in found if not v.startswith("DF_SCHED_")} - SCHEDULER_ONLY == set(VARIABLES)


@pytest.mark.parametrize("variables", [{}, VARIABLES], ids=["defaults", "all-set"])
def test_scheduler_in_its_container_renders_the_stages_as_the_operator_did(
    variables: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy/compose.scheduler.yaml: compose run in the scheduler's container, with only the
    scheduler's environment, gives every stage (and the shared volumes) the configuration the
    operator's `docker compose up` gave them, so replicas it adds match the running ones."""
    for key in [k for k in os.environ if k.startswith(("DF_", "COMPOSE_"))]:
        monkeypatch.delenv(key)  # e.g. the DF_IMAGE that `make test-compose` exports
    env_file = tmp_path / "operator.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in {**variables, "DF_DOCKER_GID": "990"}.items()))
    stage_files = (GPU_OVERRIDE, HOSTNET_OVERRIDE)
    operator = compose_client(
        *stage_files, SCHEDULER_OVERRIDE, project="opproj", env_file=env_file, profiles=["scheduler"]
    ).compose.config(return_json=True)
    scheduler_env = {k: v for k, v in operator["services"]["scheduler"]["environment"].items() if v is not None}
    assert scheduler_env["DF_SCHED_ACTUATOR"] == "compose"
    assert scheduler_env["DF_SCHED_COMPOSE_PROJECT"] == "opproj"
    assert operator["services"]["scheduler"]["group_add"] == ["990"]

    for key, value in scheduler_env.items():
        monkeypatch.setenv(key, value)
    # what the actuator in the container runs: the files named by DF_SCHED_COMPOSE_FILES (here
    # their host paths; the container sees the same files mounted), no env file
    inside = compose_client(*stage_files, project=scheduler_env["DF_SCHED_COMPOSE_PROJECT"]).compose.config(
        return_json=True
    )
    for name in STAGES:
        assert inside["services"][name] == operator["services"][name], name
    assert inside["volumes"] == operator["volumes"]
    if variables:
        assert inside["services"]["dit"]["environment"]["DF_NATS_URL"] == "nats://127.0.0.1:14401"


def test_joining_stages_use_the_other_hosts_servers_and_start_none(tmp_path: Path) -> None:
    env_file = tmp_path / "join.env"
    env_file.write_text("DF_JOIN_NATS_URL=nats://host-a:4222\nDF_JOIN_REDIS_URL=redis://host-a:6379/0\n")
    config = compose_client(JOIN_OVERRIDE, env_file=env_file).compose.config(return_json=True)
    for name in STAGES:
        service = config["services"][name]
        assert not service.get("depends_on"), name  # `up dit` starts no nats or redis here
        assert service["environment"]["DF_NATS_URL"] == "nats://host-a:4222"
        assert service["environment"]["DF_REDIS_URL"] == "redis://host-a:6379/0"
        assert service["environment"]["DF_MODELS"] == "tiny,small"
        assert {v["target"]: v["source"] for v in service["volumes"]}["/dev/shm/disagfusion"] == "shm"
    hub = compose_client(ROOT / "deploy/compose.hub.yaml").compose.config(return_json=True)["services"]["redis"]
    [port] = hub["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("0.0.0.0", "6379", 6379)


def test_nats_cluster_on_loopback_ports(tmp_path: Path) -> None:
    env_file = tmp_path / "cluster.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in VARIABLES.items()))
    config = compose_client(HOSTNET_OVERRIDE, ROOT / "deploy/compose.nats-cluster.yaml",
                            ROOT / "deploy/compose.nats-cluster.hostnet.yaml", env_file=env_file).compose.config(
        return_json=True)["services"]
    routes = "nats://127.0.0.1:14404,nats://127.0.0.1:14407,nats://127.0.0.1:14410"
    for node, port, cluster in (("nats", "14401", "14404"), ("nats-2", "14405", "14407"), ("nats-3", "14408", "14410")):
        command = config[node]["command"]
        assert config[node]["network_mode"] == "host" and not config[node].get("ports")
        assert command[command.index("-p") + 1] == port and command[command.index("-a") + 1] == "127.0.0.1"
        assert command[command.index("--cluster") + 1] == f"nats://127.0.0.1:{cluster}"
        assert command[-1] == routes
    for name in STAGES:
        environment = config[name]["environment"]
        assert environment["DF_NATS_URL"] == "nats://127.0.0.1:14401,nats://127.0.0.1:14405,nats://127.0.0.1:14408"
        assert environment["DF_STREAM_REPLICAS"] == "3"
