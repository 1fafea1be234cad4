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


def test_the_trainer_job_points_at_the_service() -> None:
    manifests = _manifests()
    (container,) = manifests[("Job", "ddpo-train")]["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    service = manifests[("Service", "ddpo-reward-server")]
    grpc_port = {port["name"]: port["port"] for port in service["spec"]["ports"]}["grpc"]
    assert args[0] == "train"
    assert args[args.index("--reward-server") + 1] == f"{service['metadata']['name']}:{grpc_port}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_manifests() -> None:
    built = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    kinds = [document["kind"] for document in yaml.safe_load_all(built.stdout)]
    assert sorted(kinds) == ["ConfigMap", "Deployment", "Job", "Service"]
