"""Dry checks of the container and cluster files (no Docker engine or cluster runs here; docs/deploy.md says so)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from reward_server.config import load_config
from tests.support import ROOT

DEPLOY = ROOT / "deploy"


def _manifests() -> dict[tuple[str, str], dict[str, Any]]:
    documents = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document["kind"] != "Kustomization":
                documents[(document["kind"], document["metadata"]["name"])] = document
    return documents


def test_every_manifest_is_valid_against_the_kubernetes_schemas() -> None:
    """kubernetes-validate checks each object against the API schemas (strict: no unknown fields), offline."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    manifests = _manifests()
    assert len(manifests) >= 11
    for document in manifests.values():
        kubernetes_validate.validate(document, version, strict=True)  # raises, naming the field, if invalid
    broken = {**manifests[("Deployment", "ddpo-reward-server")], "spec": {"replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)  # the check does check


def test_the_reward_servers_scale_out_behind_a_headless_service() -> None:
    manifests = _manifests()
    deployment = manifests[("Deployment", "ddpo-reward-server")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] >= 2
    headless = manifests[("Service", "ddpo-reward-server-headless")]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["selector"].items() <= labels.items()
    budget = manifests[("PodDisruptionBudget", "ddpo-reward-server")]["spec"]
    assert budget["minAvailable"] == 1
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    autoscaler = manifests[("HorizontalPodAutoscaler", "ddpo-reward-server")]["spec"]
    assert autoscaler["scaleTargetRef"]["name"] == "ddpo-reward-server"
    assert autoscaler["metrics"][0]["pods"]["metric"]["name"] == "ddpo_reward_queued_items"  # the server's gauge
    from reward_server.metrics import ServerMetrics

    exported = {metric.name for metric in ServerMetrics().registry.collect()}
    assert "ddpo_reward_queued_items" in exported
    port = {p["name"]: p["port"] for p in headless["ports"]}["grpc"]
    for job in ("ddpo-train", "ddpo-train-8gpu", "ddpo-train-multinode"):
        (container,) = manifests[("Job", job)]["spec"]["template"]["spec"]["containers"]
        arguments = container["args"]
        address = arguments[arguments.index("--reward-server") + 1]
        assert address == f"dns:///ddpo-reward-server-headless:{port}", job


def test_the_multi_gpu_and_multi_node_trainers_launch_one_process_per_gpu() -> None:
    manifests = _manifests()
    (single,) = manifests[("Job", "ddpo-train-8gpu")]["spec"]["template"]["spec"]["containers"]
    gpus = single["resources"]["limits"]["nvidia.com/gpu"]
    assert single["command"][:2] == ["accelerate", "launch"]
    assert single["command"][single["command"].index("--num_processes") + 1] == str(gpus)
    job = manifests[("Job", "ddpo-train-multinode")]["spec"]
    (multi,) = job["template"]["spec"]["containers"]
    command = multi["command"]
    assert command[0] == "torchrun"
    assert command[command.index("--nnodes") + 1] == str(job["completions"]) == str(job["parallelism"])
    assert command[command.index("--nproc_per_node") + 1] == str(multi["resources"]["limits"]["nvidia.com/gpu"])
    endpoint = command[command.index("--rdzv_endpoint") + 1]
    service = manifests[("Service", "ddpo-train-multinode")]
    assert job["completionMode"] == "Indexed"
    assert job["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert endpoint == f"ddpo-train-multinode-0.{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.triton"])
def test_dockerfiles_copy_what_exists_and_start_a_server(name: str) -> None:
    instructions = _instructions(DEPLOY / "docker" / name)
    assert instructions[0][0] in ("FROM", "ARG")
    assert "FROM" in [op for op, _ in instructions]
    for op, args in instructions:
        assert op in {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "ENTRYPOINT", "CMD"}, op
        if op == "COPY":
            *sources, _ = args.split()
            assert all((ROOT / source).exists() for source in sources), args
    assert any(op in ("CMD", "ENTRYPOINT") for op, _ in instructions)


def test_the_reward_server_deployment_is_ready_on_grpc_health_and_scraped() -> None:
    manifests = _manifests()
    deployment = manifests[("Deployment", "ddpo-reward-server")]
    service = manifests[("Service", "ddpo-reward-server")]
    template = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    (container,) = template["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    assert container["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = container["args"]
    assert args[args.index("--port") + 1] == str(ports["grpc"])
    assert args[args.index("--metrics-port") + 1] == str(ports["metrics"])
    # the readiness probe waits for a reward that the mounted config really serves
    config_map = manifests[("ConfigMap", "ddpo-rewards")]
    config_file = Path(args[args.index("--config") + 1])
    assert config_file.name in config_map["data"]
    served = container["readinessProbe"]["grpc"]["service"].removeprefix("reward/")
    assert served in config_map["data"][config_file.name]
    service_ports = {port["name"]: port["port"] for port in service["spec"]["ports"]}
    assert service_ports["grpc"] == ports["grpc"]


def test_the_reward_config_in_the_config_map_parses(tmp_path: Path) -> None:
    config_map = _manifests()[("ConfigMap", "ddpo-rewards")]
    path = tmp_path / "rewards.toml"
    path.write_text(config_map["data"]["rewards.toml"])
    assert [reward.name for reward in load_config(path).rewards] == ["jpeg_compressibility", "aesthetic"]


def test_the_token_comes_from_a_secret_and_only_the_trainer_and_prometheus_get_in() -> None:
    manifests = _manifests()
    server = manifests[("Deployment", "ddpo-reward-server")]["spec"]["template"]
    job = manifests[("Job", "ddpo-train")]["spec"]["template"]
    for pod in (server, job):
        (container,) = pod["spec"]["containers"]
        token_file = Path(container["args"][container["args"].index("--auth-token-file") + 1])
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(token_file.parent))
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "ddpo-reward-token"  # never a literal token in a manifest
    (server_container,) = server["spec"]["containers"]
    assert server_container["args"][server_container["args"].index("--host") + 1] == "0.0.0.0"  # hence the token
    policy = manifests[("NetworkPolicy", "ddpo-reward-server")]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= server["metadata"]["labels"].items()
    grpc_rule, metrics_rule = policy["ingress"]
    assert grpc_rule["from"][0]["podSelector"]["matchLabels"].items() <= job["metadata"]["labels"].items()
    assert [p["port"] for p in grpc_rule["ports"]] == ["grpc"]
    assert [p["port"] for p in metrics_rule["ports"]] == ["metrics"]
    assert metrics_rule["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


def _kustomize(folder: str) -> list[dict[str, Any]]:
    built = subprocess.run(["kubectl", "kustomize", str(DEPLOY / folder)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    return list(yaml.safe_load_all(built.stdout))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_manifests_with_and_without_tls() -> None:
    kinds = sorted(d["kind"] for d in _kustomize("k8s"))
    assert kinds == ["ConfigMap", "Deployment", "Job", "NetworkPolicy", "PodDisruptionBudget", "Service", "Service"]
    with_tls = {d["kind"]: d for d in _kustomize("k8s-tls")}
    (server,) = with_tls["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert "--tls-cert=/etc/ddpo/tls/tls.crt" in server["args"]
    assert "--tls-key=/etc/ddpo/tls/tls.key" in server["args"]
    (trainer,) = with_tls["Job"]["spec"]["template"]["spec"]["containers"]
    assert trainer["args"][trainer["args"].index("--reward-server") + 1] == "dns:///ddpo-reward-server-headless:50051"
    assert "reward.ca_file='/etc/ddpo/tls/tls.crt'" in trainer["args"]
    for pod in (with_tls["Deployment"], with_tls["Job"]):
        volumes = {v["name"]: v for v in pod["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "ddpo-reward-tls"
