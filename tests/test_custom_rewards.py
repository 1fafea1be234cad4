"""Custom rewards: plugins, composites, remote endpoints (grpc://, http://) and the admin service, on real servers."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from clients import RewardClient, RewardServiceError
from clients.admin import AdminClient
from reward_server.rewards.remote import RemoteReward
from tests.support import DDPO, EXAMPLE_PLUGIN, ROOT, ServerProcess, ServerThread, plugin_env, read_metrics, train_tiny

sys.path.insert(0, str(EXAMPLE_PLUGIN))
import ddpo_example_rewards as example

CONFIG = """
[server]
plugins = ["ddpo_example_rewards"]

[rewards.jpeg_incompressibility]
[rewards.brightness]
options = { gamma = 2.0 }
max_batch_size = 4

[rewards.colour_match]

[rewards.bright_and_big]
type = "composite"
weights = { jpeg_incompressibility = 1.0, brightness = 0.5 }

[rewards.bright_and_red]
type = "composite"
weights = { brightness = 0.01, colour_match = 2.0 }
"""


@pytest.fixture(scope="module")
def plugin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`ddpo serve` with a plugin module's rewards, two composites, metrics and an admin token."""
    folder = tmp_path_factory.mktemp("plugin-server")
    (folder / "rewards.toml").write_text(CONFIG)
    (folder / "admin.token").write_text("s3cret\n")
    args = ["--config", str(folder / "rewards.toml"), "--metrics-port", "0"]
    with ServerProcess(*args, "--admin-token-file", str(folder / "admin.token"), env=plugin_env()) as server:
        yield server


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


# --- plugins ---------------------------------------------------------------------------------------------------------


def test_a_plugin_s_rewards_are_listed_served_batched_and_health_checked(
    plugin_server: ServerProcess, photo_batch: npt.NDArray[np.uint8]
) -> None:
    images = [*photo_batch, *photo_batch]  # 12 items, max_batch_size 4
    with RewardClient(plugin_server.address) as client:
        listed = {info.name: info for info in client.list_rewards()}
        assert listed["brightness"].description == "Mean luma (BT.601) of the image after a gamma curve, 0-255"
        assert listed["brightness"].units == "level"
        assert listed["colour_match"].requires_prompt
        assert listed["colour_match"].component_names == ("distance",)
        client.wait_ready(timeout=10, rewards=["brightness", "colour_match"])
        scores = client.score("brightness", images).scores
    expected = example.brightness(images, [None] * 12, [{}] * 12, gamma=2.0)
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    assert _health(plugin_server.address, "reward/brightness") == health_pb2.HealthCheckResponse.SERVING
    metrics = urllib.request.urlopen(plugin_server.metrics_url, timeout=10).read().decode()
    samples = [
        sample
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.labels.get("reward") == "brightness" and sample.name.startswith("ddpo_reward_batch_size")
    ]
    count = next(s.value for s in samples if s.name == "ddpo_reward_batch_size_count")
    at_most_4 = next(s.value for s in samples if s.name == "ddpo_reward_batch_size_bucket" and s.labels["le"] == "4.0")
    assert count >= 3
    assert at_most_4 == count


def test_a_plugin_s_item_errors_and_prompt_requirement_pass_through(
    plugin_server: ServerProcess, photo_batch: npt.NDArray[np.uint8]
) -> None:
    red = np.full((32, 32, 3), (220, 40, 40), np.uint8)
    with RewardClient(plugin_server.address) as client:
        batch = client.score("colour_match", [red, red, red], prompts=["a red circle", "a circle", None])
    assert batch.items[0].ok
    assert batch.items[0].score == pytest.approx(0.0, abs=1e-12)
    assert batch.items[0].info == {"colour": "red"}
    assert batch.items[1].code == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt 'a circle' names no colour" in batch.items[1].message
    assert batch.items[2].code == grpc.StatusCode.INVALID_ARGUMENT  # the server checks requires_prompt
    assert "prompt" in batch.items[2].message


def test_a_reward_type_from_an_installed_package_s_entry_point_is_served(
    tmp_path: Path, photo_batch: npt.NDArray[np.uint8]
) -> None:
    package = shutil.copytree(EXAMPLE_PLUGIN, tmp_path / "src")
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(package),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with ServerProcess("--rewards", "colour_match,brightness", env=plugin_env(site)) as server:  # no --plugin
        client = RewardClient(server.address)
        with client:
            assert {info.name for info in client.list_rewards()} == {"colour_match", "brightness"}
            scores = client.score("brightness", photo_batch).scores
    np.testing.assert_allclose(scores, example.brightness(list(photo_batch), [None] * 6, [{}] * 6), rtol=1e-12)


BROKEN_PLUGINS = {
    "raises": ("raise RuntimeError('no GPU here')\n", "plugin 'broken' failed to import: RuntimeError: no GPU here"),
    "registers_nothing": ("X = 1\n", "plugin 'broken' imported but registered no reward type"),
    "bad_signature": (
        "from reward_server.plugins import reward\n"
        "@reward(name='b', description='d')\n"
        "def b(images, gamma=1.0):\n    return [0.0] * len(images)\n",
        "must take (images, prompts, metadata) and then only keyword-only options",
    ),
    "not_a_reward": (
        "from reward_server.plugins import register_reward_type\n@register_reward_type('b')\nclass B:\n    pass\n",
        "which is not a Reward subclass",
    ),
    "clashes_with_builtin": (
        "from reward_server.plugins import reward\n"
        "@reward(name='aesthetic', description='d')\n"
        "def b(images, prompts, metadata):\n    return [0.0] * len(images)\n",
        "registers reward type 'aesthetic', which a built-in reward already registers",
    ),
}


def _serve(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`ddpo serve ARGS` with ``folder`` on the import path; these servers fail at startup, so this returns."""
    command = [*DDPO, "serve", *args, "--port", "0"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, env=plugin_env(folder))


@pytest.mark.parametrize("case", sorted(BROKEN_PLUGINS))
def test_a_broken_plugin_fails_startup_clearly(tmp_path: Path, case: str) -> None:
    source, message = BROKEN_PLUGINS[case]
    (tmp_path / "broken.py").write_text(source)
    done = _serve(tmp_path, "--plugin", "broken")
    assert done.returncode == 2
    assert message in done.stderr


def test_a_plugin_whose_reward_breaks_the_contract_fails_startup(tmp_path: Path) -> None:
    (tmp_path / "misnamed.py").write_text(
        "from reward_server.plugins import Reward, RewardSpec, register_reward_type\n"
        "@register_reward_type('misnamed')\n"
        "class Misnamed(Reward):\n"
        "    def __init__(self, name):\n"
        "        self.spec = RewardSpec(name='fixed', description='d', version='1', units='')\n"
        "    def score(self, images, prompts, metadata):\n"
        "        raise NotImplementedError\n"
    )
    (tmp_path / "ep.dist-info").mkdir()  # an installed package whose entry point does not import
    (tmp_path / "ep.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ep\nVersion: 1\n")
    (tmp_path / "ep.dist-info" / "entry_points.txt").write_text("[ddpo.rewards]\nghost = missing_module:ghost\n")
    misnamed = _serve(tmp_path, "--plugin", "misnamed", "--rewards", "misnamed")
    assert misnamed.returncode == 1
    assert "built a reward whose spec is named 'fixed' instead of the served name 'misnamed'" in misnamed.stderr
    ghost = _serve(tmp_path, "--rewards", "ghost")
    assert ghost.returncode == 1
    assert "entry point ghost = 'missing_module:ghost' in group 'ddpo.rewards' (package ep) failed to import" in (
        ghost.stderr
    )


# --- composites ------------------------------------------------------------------------------------------------------


def test_composite_totals_equal_the_weighted_components(
    plugin_server: ServerProcess, photo_batch: npt.NDArray[np.uint8]
) -> None:
    with RewardClient(plugin_server.address) as client:
        listed = {info.name: info for info in client.list_rewards()}
        assert listed["bright_and_big"].component_names == ("jpeg_incompressibility", "brightness")
        assert listed["bright_and_red"].requires_prompt  # because colour_match needs one
        client.wait_ready(timeout=10, rewards=["bright_and_big"])
        total = client.score("bright_and_big", photo_batch)
        jpeg = client.score("jpeg_incompressibility", photo_batch).scores
        bright = client.score("brightness", photo_batch).scores
        per_request = client.score("mix", photo_batch, weights={"jpeg_incompressibility": -2.0, "brightness": 0.25})
    np.testing.assert_allclose(total.scores, jpeg + 0.5 * bright, rtol=1e-12)
    assert [r.components["jpeg_incompressibility"] for r in total.items] == list(jpeg)
    assert [r.components["brightness"] for r in total.items] == list(bright)
    np.testing.assert_allclose(per_request.scores, -2.0 * jpeg + 0.25 * bright, rtol=1e-12)


def test_a_composite_item_fails_when_a_component_fails_and_says_which(plugin_server: ServerProcess) -> None:
    red = np.full((32, 32, 3), (220, 40, 40), np.uint8)
    with RewardClient(plugin_server.address) as client:
        batch = client.score("bright_and_red", [red, red], prompts=["red", "a square"])
    assert batch.items[0].ok
    assert batch.items[0].components["colour_match.distance"] == pytest.approx(0.0, abs=1e-12)
    assert batch.items[0].info == {"colour_match.colour": "red"}
    assert batch.items[1].code == grpc.StatusCode.INVALID_ARGUMENT
    assert batch.items[1].message.startswith("component 'colour_match' of 'bright_and_red' failed: prompt 'a square'")


def test_bad_per_request_weights_are_refused(plugin_server: ServerProcess, photo_batch: npt.NDArray[np.uint8]) -> None:
    with RewardClient(plugin_server.address) as client:
        with pytest.raises(RewardServiceError) as unknown:
            client.score("mix", photo_batch, weights={"brightness": 1.0, "nope": 1.0})
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
        assert "'nope'" in unknown.value.message
        with pytest.raises(RewardServiceError) as nested:
            client.score("mix", photo_batch, weights={"bright_and_big": 1.0})
        assert nested.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "is itself a composite" in nested.value.message
        with pytest.raises(RewardServiceError) as infinite:
            client.score("mix", photo_batch, weights={"brightness": float("inf")})
        assert infinite.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "finite" in infinite.value.message


def test_the_trainer_trains_on_a_composite(plugin_server: ServerProcess, tmp_path: Path) -> None:
    done = train_tiny(
        plugin_server.address,
        tmp_path,
        *("--reward", "bright_and_big", "--epochs", "1", "sample.num_steps=5", "eval.enabled=false"),
        *("log.tensorboard=false", "log.images_every=0", "sample.num_batches_per_epoch=1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics,) = read_metrics(tmp_path)
    assert np.isfinite(metrics["reward_mean"])
    assert metrics["samples"] > 0


# --- remote endpoints through the admin service ---------------------------------------------------------------------


def test_admin_calls_need_the_admin_token(plugin_server: ServerProcess, tmp_path: Path) -> None:
    url = f"grpc://{plugin_server.address}/brightness"
    with RewardClient(plugin_server.address) as anonymous:  # sends no token
        from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
        from clients.generated.ddpo.reward.v1 import reward_pb2_grpc as pb_grpc

        stub = pb_grpc.RewardAdminStub(anonymous._channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.RegisterEndpoint(pb.RegisterEndpointRequest(endpoint=pb.Endpoint(name="x", url=url)), timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with AdminClient(plugin_server.address, admin_token="wrong") as wrong:
        with pytest.raises(RewardServiceError) as denied:
            wrong.register_endpoint("x", url)
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    with ServerProcess("--rewards", "jpeg_compressibility") as closed:  # no admin token: admin calls are off
        admin = AdminClient(closed.address, admin_token="s3cret")
        with admin, pytest.raises(RewardServiceError) as disabled:
            admin.list_rewards_admin()
    assert disabled.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "--admin-token-file" in disabled.value.message
    with RewardClient(plugin_server.address) as client:
        assert "x" not in {info.name for info in client.list_rewards()}


def test_a_second_server_registered_at_runtime_serves_through_the_first(
    plugin_server: ServerProcess, tmp_path: Path, photo_batch: npt.NDArray[np.uint8]
) -> None:
    (tmp_path / "admin.token").write_text("front-token")
    endpoints = tmp_path / "endpoints.json"
    front_args = ["--rewards", "jpeg_compressibility", "--admin-token-file", str(tmp_path / "admin.token")]
    front_args += ["--endpoints-file", str(endpoints), "--config", str(_fast_health(tmp_path))]
    red = np.full((32, 32, 3), (220, 40, 40), np.uint8)
    images, prompts = [red, photo_batch[0], red], ["red", "a photo", "blue"]
    with RewardClient(plugin_server.address) as back_client:
        expected = back_client.score("colour_match", images, prompts=prompts).items
    with ServerProcess(*front_args) as front, AdminClient(front.address, admin_token="front-token") as admin:
        url = f"grpc://{plugin_server.address}/colour_match"
        info = admin.register_endpoint("judge", url, {"timeout_s": 20, "max_attempts": 2, "max_batch_size": 8})
        assert info.name == "judge"
        assert info.requires_prompt
        assert info.component_names == ("distance",)
        got = admin.score("judge", images, prompts=prompts).items
        assert [r.score for r in got if r.ok] == [r.score for r in expected if r.ok]
        assert [r.code for r in got] == [r.code for r in expected]
        assert [r.components for r in got] == [r.components for r in expected]
        assert got[1].message == f"endpoint {url}: {expected[1].message}"  # the remote error, saying where
        assert _health(front.address, "reward/judge") == health_pb2.HealthCheckResponse.SERVING
        entries = {entry.info.name: entry for entry in admin.list_rewards_admin()}
        assert (entries["judge"].source, entries["judge"].url, entries["judge"].runtime) == ("endpoint", url, True)
        assert (entries["jpeg_compressibility"].source, entries["jpeg_compressibility"].runtime) == ("builtin", False)
        with pytest.raises(RewardServiceError) as taken:
            admin.register_endpoint("jpeg_compressibility", url)
        assert taken.value.code == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(RewardServiceError) as unreachable:
            admin.register_endpoint("gone", "grpc://127.0.0.1:1/x", {"timeout_s": 2})
        assert unreachable.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(RewardServiceError) as bad_url:
            admin.register_endpoint("bad", "ftp://example.com/x")
        assert bad_url.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "grpc://HOST:PORT/REWARD" in bad_url.value.message
        with pytest.raises(RewardServiceError) as bad_option:
            admin.register_endpoint("bad", url, {"timeout": 3})
        assert bad_option.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "timeout_s" in bad_option.value.message
        with pytest.raises(RewardServiceError) as builtin:
            admin.unregister_endpoint("jpeg_compressibility")
        assert builtin.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert json.loads(endpoints.read_text())["rewards"]["judge"]["options"]["url"] == url

    with ServerProcess(*front_args) as restarted, AdminClient(restarted.address, admin_token="front-token") as admin:
        again = admin.score("judge", images, prompts=prompts).items  # the registration survived the restart
        assert [r.score for r in again if r.ok] == [r.score for r in expected if r.ok]
        admin.unregister_endpoint("judge")
        with pytest.raises(RewardServiceError) as unregistered:
            admin.score("judge", images, prompts=prompts)
        assert unregistered.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(RewardServiceError) as twice:
            admin.unregister_endpoint("judge")
        assert twice.value.code == grpc.StatusCode.NOT_FOUND
    assert json.loads(endpoints.read_text()) == {"rewards": {}}


def test_a_saved_endpoint_that_is_gone_at_startup_can_be_unregistered(tmp_path: Path) -> None:
    """An endpoint saved by an earlier run whose server is gone fails to load; unregistering it still works."""
    (tmp_path / "admin.token").write_text("front-token")
    endpoints = tmp_path / "endpoints.json"
    gone = {"type": "remote", "options": {"url": "grpc://127.0.0.1:1/x", "timeout_s": 2, "max_attempts": 1}}
    endpoints.write_text(json.dumps({"rewards": {"gone": gone}}))
    args = ["--rewards", "jpeg_compressibility", "--admin-token-file", str(tmp_path / "admin.token")]
    with (
        ServerProcess(*args, "--endpoints-file", str(endpoints)) as front,
        AdminClient(front.address, admin_token="front-token") as admin,
    ):
        deadline = time.monotonic() + 60
        while (state := {e.info.name: e.state for e in admin.list_rewards_admin()}["gone"]) == "is still loading":
            assert time.monotonic() < deadline, "the saved endpoint never finished loading"
            time.sleep(0.2)
        assert state.startswith("failed to load")
        admin.unregister_endpoint("gone")
        assert "gone" not in {e.info.name for e in admin.list_rewards_admin()}
        with pytest.raises(RewardServiceError) as unknown:
            admin.score("gone", np.zeros((1, 8, 8, 3), np.uint8))
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
    assert json.loads(endpoints.read_text()) == {"rewards": {}}


def _fast_health(folder: Path) -> Path:
    path = folder / "fast-health.toml"
    path.write_text("[server]\nhealth_interval_s = 0.3\n")
    return path


def test_a_remote_endpoint_s_health_and_outage_propagate(tmp_path: Path, photo_batch: npt.NDArray[np.uint8]) -> None:
    with ServerProcess("--rewards", "jpeg_compressibility") as back:
        url = f"grpc://{back.address}/jpeg_compressibility"
        remote = RemoteReward("forwarded", url, timeout_s=5, max_attempts=2)
        with ServerThread([remote], health_interval_s=0.3) as front, RewardClient(front.address) as client:
            assert client.score("forwarded", photo_batch[:2]).ok
            assert _health(front.address, "reward/forwarded") == health_pb2.HealthCheckResponse.SERVING
            assert back.terminate() == 0
            deadline = time.monotonic() + 30
            while _health(front.address, "reward/forwarded") != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "the endpoint's outage never reached our health service"
                time.sleep(0.2)
            batch = client.score("forwarded", photo_batch[:2])
    assert [r.code for r in batch.items] == [grpc.StatusCode.UNAVAILABLE] * 2  # never a made-up score
    assert batch.items[0].message.startswith(f"endpoint {url}: ")


# --- the HTTP JSON endpoint -------------------------------------------------------------------------------------------


class _JsonReward(BaseHTTPRequestHandler):
    """A small HTTP reward: the mean of the red channel; prompt "bad" fails its item; see ``behaviour``."""

    behaviour: ClassVar[dict[str, Any]] = {}
    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append({"body": body, "authorization": self.headers.get("Authorization")})
        if self.behaviour.get("fail_first") and len(self.requests) == 1:
            return self._send(503, b"warming up")
        if self.behaviour.get("malformed"):
            return self._send(200, b'{"results": [{"id": "0", "score": "high"}]}')
        if self.behaviour.get("slow"):
            time.sleep(3)
        results = []
        for item in body["items"]:
            if item["prompt"] == "bad":
                results.append({"id": item["id"], "error": {"code": "FAILED_PRECONDITION", "message": "not this"}})
                continue
            image = _decode(item["image"])
            results.append({"id": item["id"], "score": float(image[..., 0].mean()), "info": {"h": str(image.shape[0])}})
        self._send(200, json.dumps({"results": results}).encode())

    def do_GET(self) -> None:
        self._send(200 if self.path == "/health" else 404, b"ok")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _decode(image: dict[str, Any]) -> npt.NDArray[np.uint8]:
    data = base64.b64decode(image["data"])
    if image["format"] == "raw":
        return np.frombuffer(data, np.uint8).reshape(image["shape"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture
def http_endpoint() -> Iterator[str]:
    _JsonReward.behaviour, _JsonReward.requests = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JsonReward)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("image_format", ["png", "raw"])
def test_the_http_json_adapter_scores_through_a_small_http_server(
    http_endpoint: str, image_format: str, tmp_path: Path, photo_batch: npt.NDArray[np.uint8]
) -> None:
    (tmp_path / "token").write_text("http-token")
    options: dict[str, Any] = {"description": "red level", "units": "level", "health_url": f"{http_endpoint}/health"}
    remote = RemoteReward(
        "red", f"{http_endpoint}/score", image_format=image_format, auth_token_file=str(tmp_path / "token"), **options
    )
    with ServerThread([remote], health_interval_s=0.3) as front, RewardClient(front.address) as client:
        info = {i.name: i for i in client.list_rewards()}["red"]
        assert (info.description, info.units) == ("red level", "level")
        batch = client.score("red", photo_batch[:3], prompts=["a", "bad", None])
    assert batch.items[0].score == pytest.approx(float(photo_batch[0][..., 0].mean()))
    assert batch.items[0].info == {"h": "128"}
    assert batch.items[1].code == grpc.StatusCode.FAILED_PRECONDITION
    assert batch.items[1].message.endswith("not this")
    assert batch.items[2].score == pytest.approx(float(photo_batch[2][..., 0].mean()))
    (request,) = _JsonReward.requests
    assert request["authorization"] == "Bearer http-token"
    assert request["body"]["reward"] == "red"
    assert [item["prompt"] for item in request["body"]["items"]] == [
        "a",
        "bad",
        None,
    ]
    assert {item["image"]["format"] for item in request["body"]["items"]} == {image_format}


def test_the_http_adapter_retries_unavailable_and_reports_broken_answers(
    http_endpoint: str, photo_batch: npt.NDArray[np.uint8]
) -> None:
    _JsonReward.behaviour = {"fail_first": True}
    retried = RemoteReward("red", f"{http_endpoint}/score", max_attempts=2).score(
        list(photo_batch[:2]), [None] * 2, [{}] * 2
    )
    assert retried.errors == [None, None]
    assert len(_JsonReward.requests) == 2

    _JsonReward.behaviour, _JsonReward.requests = {"fail_first": True}, []
    once = RemoteReward("red", f"{http_endpoint}/score", max_attempts=1).score(list(photo_batch[:1]), [None], [{}])
    assert once.errors is not None
    assert once.errors[0] is not None
    assert once.errors[0].code == grpc.StatusCode.UNAVAILABLE
    assert "HTTP 503" in once.errors[0].message

    _JsonReward.behaviour = {"malformed": True}
    broken = RemoteReward("red", f"{http_endpoint}/score").score(list(photo_batch[:1]), [None], [{}])
    assert broken.errors is not None
    assert broken.errors[0] is not None
    assert broken.errors[0].code == grpc.StatusCode.INTERNAL
    assert "score must be a finite number" in broken.errors[0].message

    _JsonReward.behaviour = {"slow": True}
    late = RemoteReward("red", f"{http_endpoint}/score", timeout_s=0.5).score(list(photo_batch[:1]), [None], [{}])
    assert late.errors is not None
    assert late.errors[0] is not None
    assert late.errors[0].code == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("grpc://127.0.0.1/x", {}, "a port is required"),
        ("mailto:someone", {}, "is not one of"),
        ("grpc://127.0.0.1:5/x", {"description": "d"}, "describe HTTP endpoints"),
        ("http://127.0.0.1:5/x", {"timeout_s": 0}, "timeout_s must be in (0, 3600]"),
        ("http://127.0.0.1:5/x", {"max_attempts": 11}, "max_attempts must be an int in 1..10"),
        ("http://127.0.0.1:5/x", {"image_format": "jpeg"}, "image_format must be 'png' or 'raw'"),
    ],
)
def test_bad_endpoint_settings_are_refused(url: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        RemoteReward("r", url, **options)


def test_a_composite_whose_component_fails_to_load_says_so(tmp_path: Path) -> None:
    (tmp_path / "rewards.toml").write_text(
        '[rewards.jpeg_compressibility]\n[rewards.judge]\ntype = "remote"\noptions = { url = "grpc://127.0.0.1:1/x" }\n'
        '[rewards.both]\ntype = "composite"\nweights = { jpeg_compressibility = 1.0, judge = 1.0 }\n'
    )
    with ServerProcess("--config", str(tmp_path / "rewards.toml")) as server, RewardClient(server.address) as client:
        listing = {info.name: info for info in client.list_rewards()}
        with pytest.raises(RewardServiceError) as refused:
            client.score("both", np.zeros((1, 8, 8, 3), np.uint8))
    assert listing["judge"].load_error.startswith("failed to load: RewardServiceError")
    assert listing["both"].load_error.startswith("failed to load: component 'judge' failed to load")
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "component 'judge'" in refused.value.message


def test_ddpo_admin_registers_lists_and_unregisters(plugin_server: ServerProcess, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret")
    (tmp_path / "wrong").write_text("nope")

    def admin(token: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [*DDPO, "admin", "--server", plugin_server.address, "--admin-token-file", str(tmp_path / token)]
        return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)

    url = f"grpc://{plugin_server.address}/jpeg_incompressibility"
    registered = admin("token", "register", "loopback", url, "--option", "timeout_s=10", "--option", "max_batch_size=8")
    assert registered.returncode == 0, registered.stderr
    assert registered.stdout.startswith("registered loopback: Positive JPEG size")
    listed = admin("token", "list")
    assert f"loopback\tendpoint:remote {url} (runtime)\tserving" in listed.stdout.splitlines()
    assert "brightness\tplugin:brightness\tserving" in listed.stdout.splitlines()
    denied = admin("wrong", "unregister", "loopback")
    assert denied.returncode == 3
    assert "PERMISSION_DENIED" in denied.stderr
    assert admin("token", "unregister", "loopback").returncode == 0
    assert "loopback" not in admin("token", "list").stdout
    bad_option = admin("token", "register", "x", url, "--option", "timeout_s")
    assert bad_option.returncode == 2
    assert "must look like KEY=VALUE" in bad_option.stderr


def test_a_stream_message_with_weights_is_scored_as_a_composite(
    plugin_server: ServerProcess, photo_batch: npt.NDArray[np.uint8]
) -> None:
    from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
    from clients.generated.ddpo.reward.v1 import reward_pb2_grpc as pb_grpc

    def item(index: int) -> pb.Item:
        image = photo_batch[index]
        raw = pb.RawImage(data=image.tobytes(), height=image.shape[0], width=image.shape[1], channels=3)
        return pb.Item(id=str(index), image=pb.Image(raw=raw))

    weights = {"jpeg_incompressibility": 1.0, "brightness": -1.0}
    request = pb.ScoreStreamRequest(reward="ignored", items=[item(i) for i in range(3)], weights=weights)
    with grpc.insecure_channel(plugin_server.address) as channel:
        responses = list(pb_grpc.RewardServiceStub(channel).ScoreStream(iter([request]), timeout=30))
    got = {result.id: result.score for response in responses for result in response.results}
    with RewardClient(plugin_server.address) as client:
        expected = client.score("w", photo_batch[:3], weights=weights).scores
    assert [got[str(i)] for i in range(3)] == list(expected)


def test_composites_and_remote_endpoints_are_not_exported_to_triton(tmp_path: Path) -> None:
    (tmp_path / "rewards.toml").write_text(
        '[rewards.jpeg_compressibility]\n[rewards.judge]\ntype = "remote"\noptions = { url = "grpc://127.0.0.1:1/x" }\n'
        '[rewards.both]\ntype = "composite"\nweights = { jpeg_compressibility = 1.0, judge = 1.0 }\n'
    )
    export = [*DDPO, "triton", "export", "--config", str(tmp_path / "rewards.toml"), "--out", str(tmp_path / "out")]
    refused = subprocess.run(export, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "cannot export judge (remote), both (composite) to Triton" in refused.stderr
    assert not (tmp_path / "out").exists()
    only_jpeg = subprocess.run(
        [*export, "--rewards", "jpeg_compressibility"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert only_jpeg.returncode == 0, only_jpeg.stderr
    assert (tmp_path / "out" / "jpeg_compressibility" / "config.pbtxt").is_file()


def test_the_admin_listing_of_a_reward_object_given_in_process_has_no_type(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    remote = RemoteReward("late", "http://127.0.0.1:1/score")  # an object, not a config table
    with ServerThread([remote], admin_token_file=tmp_path / "token") as server:
        admin = AdminClient(server.address, admin_token="t")
        with admin:
            (entry,) = admin.list_rewards_admin()
    assert (entry.info.name, entry.type, entry.source, entry.url) == ("late", "", "unspecified", "")
    assert entry.state == "serving"
