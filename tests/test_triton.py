"""The rewards on a real Triton Inference Server (the tritonserver bundled in nvidia-pytriton, on the CPU).

The same config is served by the project's gRPC server and by Triton, through an exported model repository and
through the PyTriton frontend; the ``triton://`` client must give the same answers as the gRPC client.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from clients import RewardClient, RewardServiceError, TritonRewardClient, open_client
from reward_server.rewards.remote import RemoteReward
from tests.support import (
    DDPO,
    HEAD,
    ROOT,
    ServerProcess,
    ServerThread,
    TritonProcess,
    free_port,
    plugin_env,
    read_metrics,
    train_tiny,
)

pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (pip install 'ddpo[triton]')")
pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")

JPEG = ("jpeg_compressibility", "jpeg_incompressibility")
PLUGIN = "brightness"  # a plugin's reward (docs/examples/custom-reward), exported and served like built-in ones


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path) -> Path:
    """JPEG rewards, a queue delay long enough to see batching, a plugin's reward, and (with the real head) a
    tiny-backbone aesthetic."""
    path = tmp_path_factory.mktemp("triton-config") / "rewards.toml"
    text = '[server]\nplugins = ["ddpo_example_rewards"]\n\n'
    text += "".join(f"[rewards.{name}]\nmax_batch_size = 16\nmax_queue_delay_ms = 200\n\n" for name in JPEG)
    text += f"[rewards.{PLUGIN}]\noptions = {{ gamma = 2.2 }}\n\n"
    if HEAD.is_file():
        text += f'[rewards.aesthetic]\noptions = {{ clip_model = "{tiny_clip}", head_path = "{HEAD}" }}\n'
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def grpc_server(config_file: Path) -> Iterator[ServerProcess]:
    with ServerProcess("--config", str(config_file), env=plugin_env()) as server:
        yield server


@pytest.fixture(scope="module")
def repository(config_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model-repository")
    done = subprocess.run(
        [*DDPO, "triton", "export", "--config", str(config_file), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=plugin_env(),
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module", params=["tritonserver", "pytriton"])
def triton(
    request: pytest.FixtureRequest, repository: Path, config_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonProcess]:
    """The exported repository on `ddpo triton serve`, or the same config on `ddpo serve --frontend pytriton`."""
    log = tmp_path_factory.mktemp("triton") / f"{request.param}.log"
    if request.param == "tritonserver":
        server = TritonProcess(log, _rewards(config_file), repository=repository, env=plugin_env())
    else:
        command = [*DDPO, "serve", "--frontend", "pytriton", "--config", str(config_file)]
        server = TritonProcess(log, _rewards(config_file), command=command, env=plugin_env())
    with server:
        yield server


def _rewards(config_file: Path) -> list[str]:
    return [*JPEG, PLUGIN, *(["aesthetic"] if "aesthetic" in config_file.read_text() else [])]


def test_the_exported_repository_has_triton_s_layout(repository: Path, config_file: Path) -> None:
    for name in _rewards(config_file):
        config = (repository / name / "config.pbtxt").read_text()
        assert f'name: "{name}"' in config
        assert 'backend: "python"' in config
        assert "dynamic_batching { max_queue_delay_microseconds:" in config
        assert 'name: "IMAGES" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ]' in config
        assert "class TritonPythonModel" in (repository / name / "1" / "model.py").read_text()
    assert "max_batch_size: 16" in (repository / "jpeg_compressibility" / "config.pbtxt").read_text()
    # the plugin's model imports the plugin module before building its reward
    assert '\\"plugins\\": [\\"ddpo_example_rewards\\"]' in (repository / PLUGIN / "config.pbtxt").read_text()


def test_triton_lists_the_same_rewards_as_the_grpc_server(
    triton: TritonProcess, grpc_server: ServerProcess, config_file: Path
) -> None:
    with TritonRewardClient(triton.address) as client, RewardClient(grpc_server.address) as reference:
        if triton.frontend == "pytriton":  # its models are not in a repository index: a clear error, not []
            with pytest.raises(RewardServiceError) as unlisted:
                client.list_rewards()
            assert unlisted.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "ddpo triton serve" in unlisted.value.message
            return
        listed = sorted(client.list_rewards(), key=lambda info: info.name)
        assert [info.name for info in listed] == sorted(_rewards(config_file))
        assert listed == sorted(reference.list_rewards(), key=lambda info: info.name)


def test_triton_scores_equal_the_grpc_server_s(
    triton: TritonProcess,
    grpc_server: ServerProcess,
    config_file: Path,
    photos: dict[str, npt.NDArray[np.uint8]],
    photo_batch: npt.NDArray[np.uint8],
) -> None:
    images = [*photo_batch, photos["coffee"], photos["rocket"]]  # three sizes: three Triton requests
    prompts = [f"photo {i}" for i in range(len(images))]
    with TritonRewardClient(triton.address) as client, RewardClient(grpc_server.address) as reference:
        for reward in _rewards(config_file):
            got = client.score(reward, images, prompts=prompts)
            expected = reference.score(reward, images, prompts=prompts)
            assert [r.id for r in got.items] == [str(i) for i in range(len(images))]
            # Triton's SCORES are FP32: the same numbers, rounded to float32. A model reward's float32 forward pass
            # may differ in the last bit when the batch is split differently (Triton batches per image size).
            tolerance = 0 if reward in (*JPEG, PLUGIN) else 1e-6
            np.testing.assert_allclose(got.scores, expected.scores.astype(np.float32), rtol=tolerance, atol=0)
            assert [r.info for r in got.items] == [r.info for r in expected.items]
            assert len(set(got.scores)) > 1


def test_a_stream_through_triton_answers_every_item(triton: TritonProcess, photo_batch: npt.NDArray[np.uint8]) -> None:
    with TritonRewardClient(triton.address) as client:
        expected = client.score("jpeg_incompressibility", photo_batch).scores
        with client.open_stream(progress_timeout=60) as stream:
            first = stream.send("jpeg_incompressibility", photo_batch[:2])
            second = stream.send("jpeg_incompressibility", photo_batch[2:])
            stream.close()
            results = {r.id: r.score for r in stream.results()}
    assert first + second == [str(i) for i in range(6)]
    assert [results[str(i)] for i in range(6)] == list(expected)


def test_two_tritons_share_a_stream_and_one_killed_loses_nothing(
    triton: TritonProcess,
    repository: Path,
    config_file: Path,
    photo_batch: npt.NDArray[np.uint8],
    tmp_path: Path,
) -> None:
    """`triton://a:8001,b:8001`: one balanced stream over two real Tritons, the second SIGKILLed half way."""
    second = TritonProcess(tmp_path / "second.log", _rewards(config_file), repository=repository, env=plugin_env())
    with TritonRewardClient(triton.address) as client:
        expected = list(client.score("jpeg_incompressibility", photo_batch).scores)
    both = f"{triton.address},{second.address.removeprefix('triton://')}"
    with second, open_client(both) as client, client.open_stream(progress_timeout=60) as stream:
        sent = [stream.send("jpeg_incompressibility", photo_batch) for _ in range(4)]
        results = stream.results()
        answers = [next(results) for _ in range(24)]
        assert stream.stats[triton.address].answered > 0
        assert stream.stats[second.address].answered > 0
        sent += [stream.send("jpeg_incompressibility", photo_batch) for _ in range(4)]
        second.kill()  # with batches sent to it, answered or not
        stream.close()
        answers += list(results)
    ids = [item_id for batch in sent for item_id in batch]
    assert len(set(ids)) == 48
    assert sorted(r.id for r in answers) == sorted(ids)  # each item answered once
    by_id = {r.id: r.score for r in answers}
    assert [by_id[item_id] for batch in sent for item_id in batch] == expected * 8
    assert stream.stats[triton.address].answered + stream.stats[second.address].answered == 48


def test_concurrent_requests_are_batched_by_triton(triton: TritonProcess, photo_batch: npt.NDArray[np.uint8]) -> None:
    import tritonclient.grpc as grpcclient

    stats_client = grpcclient.InferenceServerClient(triton.address.removeprefix("triton://"))
    before = stats_client.get_inference_statistics("jpeg_compressibility", as_json=True)["model_stats"][0]

    def one(index: int) -> float:
        with TritonRewardClient(triton.address) as client:
            return float(client.score("jpeg_compressibility", photo_batch[index % 6 : index % 6 + 1]).scores[0])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        scores = list(pool.map(one, range(16)))
    after = stats_client.get_inference_statistics("jpeg_compressibility", as_json=True)["model_stats"][0]
    inferences = int(after.get("inference_count", 0)) - int(before.get("inference_count", 0))
    executions = int(after.get("execution_count", 0)) - int(before.get("execution_count", 0))
    assert inferences == 16
    assert executions < inferences  # Triton's dynamic batcher merged requests into fewer model executions
    assert scores[:6] == scores[6:12]
    metrics = urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
    assert 'nv_inference_exec_count{model="jpeg_compressibility"' in metrics  # Prometheus sees the same counters


def test_bad_input_gets_a_clear_error_and_fails_only_its_item(
    triton: TritonProcess, photo_batch: npt.NDArray[np.uint8]
) -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    with TritonRewardClient(triton.address) as client:
        batch = client.score("jpeg_compressibility", [photo_batch[0], rgba, photo_batch[1]])
        assert [r.ok for r in batch.items] == [True, False, True]
        assert batch.items[1].code == grpc.StatusCode.INVALID_ARGUMENT
        assert "Triton rewards take (H, W, 3)" in batch.items[1].message
        with pytest.raises(RewardServiceError) as unknown:
            client.score("missing", photo_batch[:1])
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
        assert "missing" in unknown.value.message

    # requests that bypass the client: Triton checks shapes; the model answers what Triton cannot check per item
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    raw = grpcclient.InferenceServerClient(triton.address.removeprefix("triton://"))

    def infer(prompt_batch: list[list[bytes]]) -> list[dict[str, Any]]:
        images = grpcclient.InferInput("IMAGES", [2, 8, 8, 3], "UINT8")
        images.set_data_from_numpy(np.zeros((2, 8, 8, 3), np.uint8))
        prompts = grpcclient.InferInput("PROMPTS", [len(prompt_batch), 1], "BYTES")
        prompts.set_data_from_numpy(np.array(prompt_batch, dtype=np.object_))
        info = raw.infer("jpeg_compressibility", [images, prompts]).as_numpy("INFO").reshape(-1)
        return [json.loads(entry) for entry in info]

    with pytest.raises(InferenceServerException) as refused:
        infer([[b"one prompt for two images"]])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "batch size does not match" in refused.value.message()
    answers = infer([[b"\xff"], [b"ok"]])
    assert [answer["error"]["code"] for answer in answers] == ["INVALID_ARGUMENT"] * 2
    assert "PROMPTS[0] is not UTF-8 text" in answers[0]["error"]["message"]


@pytest.mark.skipif(not HEAD.is_file(), reason=f"the real LAION aesthetic head is not at {HEAD}")
def test_the_model_validates_each_item_like_the_grpc_server(triton: TritonProcess) -> None:
    with TritonRewardClient(triton.address) as client:
        batch = client.score("aesthetic", [np.zeros((4, 4, 3), np.uint8), np.full((32, 32, 3), 90, np.uint8)])
    assert batch.items[0].code == grpc.StatusCode.INVALID_ARGUMENT
    assert "IMAGES[0]" in batch.items[0].message
    assert "outside the accepted range" in batch.items[0].message
    assert batch.items[1].ok
    assert np.isfinite(batch.items[1].score)


def test_a_triton_model_serves_as_a_remote_endpoint_of_the_grpc_server(
    triton: TritonProcess, photo_batch: npt.NDArray[np.uint8]
) -> None:
    remote = RemoteReward("via_triton", f"{triton.address}/{PLUGIN}", timeout_s=30)
    if triton.frontend == "pytriton":  # no repository index, so no spec to serve: it fails to load, saying why
        with ServerThread([remote]) as front, RewardClient(front.address) as client:
            (info,) = client.list_rewards()
        assert "FAILED_PRECONDITION" in info.load_error
        assert "ddpo triton serve" in info.load_error
        return
    with (
        ServerThread([remote]) as front,
        RewardClient(front.address) as client,
        TritonRewardClient(triton.address) as direct,
    ):
        (info,) = client.list_rewards()
        got = client.score("via_triton", photo_batch)
        expected = direct.score(PLUGIN, photo_batch)
        with pytest.raises(RuntimeError, match=f"no reward 'nope'; it offers .*{PLUGIN}"):
            RemoteReward("nope", f"{triton.address}/nope").load()
    assert info.description == "Mean luma (BT.601) of the image after a gamma curve, 0-255"
    assert list(got.scores) == list(expected.scores)  # Triton's float32 scores, passed through as they are


def test_the_deploy_repository_is_in_sync_with_the_exporter(tmp_path: Path) -> None:
    deploy = ROOT / "deploy" / "triton"
    check = [*DDPO, "triton", "export", "--config", str(deploy / "rewards.toml"), "--check", "--out"]
    done = subprocess.run([*check, str(deploy / "model_repository")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    stale = tmp_path / "model_repository"
    shutil.copytree(deploy / "model_repository", stale)
    config = stale / "aesthetic" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size", "max_batch_size: 1 #"))
    done = subprocess.run([*check, str(stale)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1
    assert "differs: aesthetic/config.pbtxt" in done.stderr


def test_ddpo_train_runs_against_triton(triton: TritonProcess, tmp_path: Path) -> None:
    done = train_tiny(
        triton.address,
        tmp_path,
        *("--reward", "jpeg_compressibility", "--epochs", "2", "sample.num_batches_per_epoch=2", "sample.num_steps=5"),
        *("eval.enabled=false", "log.tensorboard=false", "log.images_every=0"),
    )
    # PyTriton cannot list its models, so the trainer only waits for its reward there (clients.connect.check_rewards)
    assert done.returncode == 0, done.stderr
    metrics = read_metrics(tmp_path)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["reward_mean"] < 0 and m["samples"] == 16 for m in metrics)


def test_ddpo_score_reads_files_through_triton(
    triton: TritonProcess, photo_batch: npt.NDArray[np.uint8], tmp_path: Path
) -> None:
    from PIL import Image

    files = []
    for index, image in enumerate(photo_batch[:2]):
        files.append(tmp_path / f"{index}.png")
        Image.fromarray(image).save(files[-1])
    done = subprocess.run(
        [*DDPO, "score", "--server", triton.address, "--reward", "jpeg_incompressibility", *map(str, files)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    printed = [float(line.split("\t")[2]) for line in done.stdout.splitlines()]
    with TritonRewardClient(triton.address) as client:
        assert printed == pytest.approx(list(client.score("jpeg_incompressibility", photo_batch[:2]).scores), rel=1e-5)


@pytest.mark.parametrize("address", ["127.0.0.1:8001", "triton://127.0.0.1", "triton://:8001", "triton://h:99999"])
def test_a_malformed_triton_address_is_refused_with_the_expected_form(address: str) -> None:
    with pytest.raises(ValueError, match=r"must look like"):
        TritonRewardClient(address)


def test_waiting_for_an_absent_triton_times_out_with_the_address() -> None:
    address = f"triton://127.0.0.1:{free_port()}"
    with TritonRewardClient(address) as client, pytest.raises(TimeoutError, match=r"not ready after 0\.5s"):
        client.wait_ready(timeout=0.5)
