"""The real server on loopback: health, reflection, ListRewards, streams, concurrency, limits, deadlines, metrics,
reward failures, TLS and auth."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients import ItemResult, RewardClient, RewardServiceError
from reward_server.batching import BatchingConfig
from reward_server.rewards import build_reward
from reward_server.rewards.jpeg import JpegSize
from tests.support import BrokenReward, PromptLength, ServerProcess, ServerThread, SlowReward, mean_pixel

SERVING = health_pb2.HealthCheckResponse.SERVING


def health_status(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        )


def test_health_has_server_and_per_reward_entries(jpeg_server: ServerProcess) -> None:
    for service in ("", "ddpo.reward.v1.RewardService", "reward/jpeg_compressibility", "reward/jpeg_incompressibility"):
        assert health_status(jpeg_server.address, service) == SERVING, service
    with pytest.raises(grpc.RpcError) as caught:
        health_status(jpeg_server.address, "reward/aesthetic")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_service_without_the_proto_file(jpeg_server: ServerProcess) -> None:
    with grpc.insecure_channel(jpeg_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="ddpo.reward.v1.RewardService"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    services = {s.name for s in listed.list_services_response.service}
    assert {"ddpo.reward.v1.RewardService", "grpc.health.v1.Health"} <= services
    assert "ddpo.reward.v1.RewardAdmin" not in services  # admin calls are disabled: not advertised
    from google.protobuf import descriptor_pb2

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    reward_file = next(f for f in files if f.package == "ddpo.reward.v1")
    assert [m.name for m in reward_file.service[0].method] == ["ListRewards", "Score", "ScoreStream"]


def test_list_rewards_describes_each_reward(jpeg_server: ServerProcess) -> None:
    with RewardClient(jpeg_server.address) as client:
        rewards = {r.name: r for r in client.list_rewards()}
    assert sorted(rewards) == ["jpeg_compressibility", "jpeg_incompressibility"]
    compressibility = rewards["jpeg_compressibility"]
    assert compressibility.units == "kB"
    assert compressibility.higher_is_better
    assert compressibility.version == "1"
    assert not compressibility.requires_prompt
    assert compressibility.channels == (3,)
    assert compressibility.min_size == (1, 1)
    assert compressibility.max_size == (4096, 4096)
    assert "quality 95" in compressibility.description


def test_list_rewards_reports_prompt_need_and_components() -> None:
    with ServerThread([PromptLength()]) as server, RewardClient(server.address) as client:
        (info,) = client.list_rewards()
        batch = client.score(
            "prompt_length", [np.zeros((4, 4, 3), np.uint8)], prompts=["two words"], metadata=[{"tag": "t1"}]
        )
    assert info.requires_prompt
    assert info.component_names == ("words",)
    assert info.channels == (1, 3, 4)
    (result,) = batch.items
    assert result.score == 9
    assert result.components == {"words": 2.0}
    assert result.info == {"prompt": "two words", "tag": "t1"}


def test_a_stream_of_many_items_answers_every_id_exactly_once(jpeg_server: ServerProcess) -> None:
    rng = np.random.default_rng(1)
    images = [
        rng.integers(0, 256, (int(rng.integers(8, 40)), int(rng.integers(8, 40)), 3), dtype=np.uint8)
        for _ in range(600)
    ]
    expected = build_reward("jpeg_compressibility").score(images, [None] * 600, [{}] * 600).scores
    with RewardClient(jpeg_server.address) as client, client.open_stream() as stream:
        sent: list[str] = []
        start = 0
        for size in [1, 7, 50, 1, 141, 200, 200]:  # messages of different sizes, 600 items in all
            sent += stream.send("jpeg_compressibility", images[start : start + size])
            start += size
        stream.close()
        results = list(stream.results())
    assert len(sent) == 600
    assert sorted(r.id for r in results) == sorted(sent)
    scores = {r.id: r.score for r in results}
    np.testing.assert_array_equal([scores[i] for i in sent], expected)


def test_score_stream_generator_scores_items_as_they_are_produced(jpeg_server: ServerProcess) -> None:
    produced = []

    def produce() -> object:
        for i in range(20):
            image = np.full((16, 16, 3), i * 10, np.uint8)
            produced.append(image)
            yield image

    with RewardClient(jpeg_server.address) as client:
        results = list(client.score_stream("jpeg_incompressibility", produce()))
    assert sorted(int(r.id) for r in results) == list(range(20))
    expected = build_reward("jpeg_incompressibility").score(produced, [None] * 20, [{}] * 20).scores
    np.testing.assert_array_equal(
        sorted(results, key=lambda r: int(r.id)) and [r.score for r in sorted(results, key=lambda r: int(r.id))],
        expected,
    )


def test_score_stream_generator_raises_what_stopped_the_producer(jpeg_server: ServerProcess) -> None:
    def produce() -> object:
        yield np.zeros((8, 8, 3), np.uint8)
        yield np.zeros((8, 8, 3), np.uint8)
        yield np.zeros((8, 8, 3), np.float32)  # refused by the client's checks

    results: list[ItemResult] = []
    with RewardClient(jpeg_server.address) as client, pytest.raises(ValueError, match=r"dtype float32"):
        results.extend(client.score_stream("jpeg_compressibility", produce()))  # keeps what came before the error
    assert sorted(r.id for r in results) == ["0", "1"]
    assert all(r.ok for r in results)


def test_sixteen_concurrent_clients(jpeg_server: ServerProcess, photo_batch: npt.NDArray[np.uint8]) -> None:
    expected = build_reward("jpeg_compressibility").score(list(photo_batch), [None] * 6, [{}] * 6).scores

    def one_client(index: int) -> np.ndarray:
        images = np.roll(photo_batch, index, axis=0)
        with RewardClient(jpeg_server.address) as client:
            if index % 2:
                return client.score("jpeg_compressibility", images).scores
            with client.open_stream() as stream:
                ids = stream.send("jpeg_compressibility", images)
                stream.close()
                scores = {r.id: r.score for r in stream.results()}
            return np.array([scores[i] for i in ids])

    with ThreadPoolExecutor(16) as pool:
        outputs = list(pool.map(one_client, range(16)))
    for index, scores in enumerate(outputs):
        np.testing.assert_array_equal(scores, np.roll(expected, index))


def test_concurrent_items_are_micro_batched_and_errors_stay_per_item() -> None:
    slow = SlowReward(delay=0.3)
    with (
        ServerThread([(slow, BatchingConfig(max_batch_size=16, max_queue_delay_ms=50))]) as server,
        ThreadPoolExecutor(12) as pool,
    ):
        batches = list(pool.map(lambda i: _score_or_error(server.address, i), range(12)))
        assert server.server is not None
        registry, labels = server.server.metrics.registry, {"reward": slow.spec.name}
        scored = registry.get_sample_value("ddpo_reward_batch_size_sum", labels)
        batch_count = registry.get_sample_value("ddpo_reward_batch_size_count", labels)
    assert max(slow.batch_sizes) > 1, slow.batch_sizes  # several calls shared one batch
    assert sum(slow.batch_sizes) == 11  # the invalid item never reached the reward
    assert (scored, batch_count) == (11, len(slow.batch_sizes))  # the batch-size metric shows the same
    for index, outcome in enumerate(batches):
        if index == 5:
            assert outcome == "INVALID_ARGUMENT"
        else:
            assert outcome == pytest.approx(index)


def _score_or_error(address: str, index: int) -> float | str:
    channels = 1 if index == 5 else 3  # item 5 has the wrong channel count
    with RewardClient(address) as client:
        (result,) = client.score("slow", [np.full((4, 4, channels), index, np.uint8)]).items
    return result.score if result.ok else result.code.name


def test_deadline_exceeded_and_expired_items_are_not_scored() -> None:
    slow = SlowReward(delay=0.6)
    image = np.zeros((4, 4, 3), np.uint8)
    with (
        ServerThread([(slow, BatchingConfig(max_batch_size=1, max_queue_delay_ms=0))]) as server,
        RewardClient(server.address) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        first = pool.submit(client.score, "slow", [image])
        time.sleep(0.1)  # the first item now occupies the only instance
        with pytest.raises(RewardServiceError) as caught:
            client.score("slow", [image + 1, image + 2], timeout=0.3)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert first.result().ok
        time.sleep(0.8)
    assert slow.batch_sizes == [1]  # the two expired items were dropped, not scored


def test_full_queue_answers_resource_exhausted_and_streams_wait_instead() -> None:
    slow = SlowReward(delay=0.4)
    image = np.zeros((4, 4, 3), np.uint8)
    config = BatchingConfig(max_batch_size=2, max_queue_delay_ms=0, max_queued_items=2)
    with ServerThread([(slow, config)]) as server, RewardClient(server.address) as client:
        with ThreadPoolExecutor(2) as pool:
            busy = pool.submit(client.score, "slow", [image] * 2)  # being scored
            time.sleep(0.1)
            queued = pool.submit(client.score, "slow", [image] * 2)  # fills the queue of 2
            time.sleep(0.1)
            with pytest.raises(RewardServiceError) as caught:
                client.score("slow", [image])
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED  # full now: a retry can succeed
            assert "2 items queued" in caught.value.message
            with pytest.raises(RewardServiceError) as never:
                client.score("slow", [image] * 3)
            assert never.value.code == grpc.StatusCode.INVALID_ARGUMENT  # no retry can ever fit 3 in 2
            assert "holds at most 2 (max_queued_items)" in never.value.message
            assert "Retry" not in never.value.message
            assert busy.result().ok
            assert queued.result().ok
        with client.open_stream() as stream:  # 9 items through a queue of 2: back-pressure, nothing lost
            for i in range(3):
                stream.send("slow", [image + i] * 3)
            stream.close()
            results = list(stream.results())
    assert len(results) == 9
    assert all(r.ok for r in results)


def test_scoring_runs_off_the_event_loop() -> None:
    """While a batch takes 2 s to score, the same server answers other RPCs within a 0.5 s deadline."""
    image = np.zeros((4, 4, 3), np.uint8)
    with (
        ServerThread([SlowReward(delay=2.0)]) as server,
        RewardClient(server.address) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        busy = pool.submit(client.score, "slow", [image])
        time.sleep(0.3)
        assert not busy.done()
        assert [r.name for r in client.list_rewards(timeout=0.5)] == ["slow"]
        assert health_status(server.address, "reward/slow") == SERVING
        assert not busy.done()
        assert busy.result().ok


def test_batching_defaults_come_from_the_reward_and_config_overrides_them() -> None:
    jpeg, slow = build_reward("jpeg_compressibility"), SlowReward()
    tuned = build_reward("jpeg_incompressibility")
    with ServerThread([jpeg, slow, (tuned, BatchingConfig(max_batch_size=3, instances=1))]) as server:
        assert server.server is not None
        workers = server.server.registry.scorers
    assert (workers["jpeg_compressibility"].instances, workers["jpeg_compressibility"].max_batch_size) == (
        os.cpu_count() or 1,
        8,
    )
    assert (workers["slow"].instances, workers["slow"].max_batch_size) == (1, 32)
    assert (workers["jpeg_incompressibility"].instances, workers["jpeg_incompressibility"].max_batch_size) == (1, 3)


def test_too_many_concurrent_rpcs_are_refused_with_resource_exhausted() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    with (
        ServerThread([SlowReward(delay=0.5)], max_concurrent_rpcs=1) as server,
        RewardClient(server.address) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        busy = pool.submit(client.score, "slow", [image])
        time.sleep(0.2)
        with pytest.raises(RewardServiceError) as caught:
            client.score("slow", [image])
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert busy.result().ok


@pytest.mark.parametrize(
    ("mode", "code", "fragment"),
    [
        ("raise", "INTERNAL", "reward 'broken_raise' failed on a batch of 3: RuntimeError: model exploded"),
        ("wrong_shape", "INTERNAL", "returned scores of shape (2,) for a batch of 3"),
        ("nan", "INTERNAL", "returned a non-finite score (nan) without reporting an error"),
        ("item_error", "FAILED_PRECONDITION", "all-black image cannot be judged"),
    ],
)
def test_reward_failures_become_item_errors_never_scores(mode: str, code: str, fragment: str) -> None:
    images = [np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 7, np.uint8), np.full((4, 4, 3), 9, np.uint8)]
    with (
        ServerThread([BrokenReward(mode), build_reward("jpeg_compressibility")]) as server,
        RewardClient(server.address) as client,
    ):
        batch = client.score(f"broken_{mode}", images)
        healthy = client.score("jpeg_compressibility", images)
    failed = [r for r in batch.items if not r.ok]
    assert failed
    assert all(r.code.name == code and fragment in r.message and np.isnan(r.score) for r in failed)
    if mode in ("nan", "item_error"):  # only the black image fails
        assert [r.id for r in failed] == ["0"]
        assert [r.score for r in batch.items[1:]] == list(mean_pixel(images[1:]))
    assert healthy.ok  # another reward on the same server is unaffected


def _read_metrics(server: ServerProcess) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ddpo_")
    }


def test_metrics_count_requests_items_errors_latency_and_batch_sizes(jpeg_server: ServerProcess) -> None:
    not_found = 'ddpo_reward_requests_total{code="NOT_FOUND",method="Score"}'
    with RewardClient(jpeg_server.address) as client:
        client.score("jpeg_incompressibility", [np.zeros((8, 8, 3), np.uint8)] * 3)
        batch = client.score("jpeg_incompressibility", [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 4), np.uint8)])
        before = _read_metrics(jpeg_server).get(not_found, 0.0)
        for attempt in range(1, 6):
            with pytest.raises(RewardServiceError):
                client.score("missing", [np.zeros((8, 8, 3), np.uint8)])
            # counted once (not retried), and before the client saw the status
            assert _read_metrics(jpeg_server)[not_found] == before + attempt
    assert [r.ok for r in batch.items] == [True, False]
    metrics = _read_metrics(jpeg_server)
    assert metrics['ddpo_reward_requests_total{code="OK",method="Score"}'] >= 2
    assert metrics['ddpo_reward_items_total{code="OK",reward="jpeg_incompressibility"}'] >= 4
    assert metrics['ddpo_reward_items_total{code="INVALID_ARGUMENT",reward="jpeg_incompressibility"}'] >= 1
    assert metrics['ddpo_reward_batch_size_count{reward="jpeg_incompressibility"}'] >= 2
    assert metrics['ddpo_reward_batch_size_sum{reward="jpeg_incompressibility"}'] >= 4
    assert metrics['ddpo_reward_batch_latency_seconds_count{reward="jpeg_incompressibility"}'] >= 2
    assert metrics['ddpo_reward_item_latency_seconds_count{reward="jpeg_incompressibility"}'] >= 5


def test_graceful_shutdown_drains_work_in_flight(tmp_path: Path) -> None:
    """SIGTERM while an item is being scored: health turns NOT_SERVING, the call still succeeds, exit code 0."""
    server = ServerProcess(module="tests.slow_server")
    with server:
        image = np.full((4, 4, 3), 42, np.uint8)
        with (
            RewardClient(server.address) as client,
            ThreadPoolExecutor(1) as pool,
            grpc.insecure_channel(server.address) as channel,
        ):
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=20)
            assert next(watch).status == SERVING
            in_flight = pool.submit(client.score, "slow", [image] * 3)
            time.sleep(0.5)  # the batch is being scored (the reward sleeps 2 s)
            exit_code: list[int] = []
            stopper = threading.Thread(target=lambda: exit_code.append(server.terminate()))
            stopper.start()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(RewardServiceError) as refused:  # new work is turned away while draining
                client.list_rewards()
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            batch = in_flight.result(timeout=20)
            stopper.join(30)
    assert batch.ok
    assert list(batch.scores) == [42.0] * 3
    assert exit_code == [0], server.stderr
    assert '"event": "shutting down"' in server.stderr
    assert '"event": "stopped"' in server.stderr


def test_tls_and_bearer_token(tmp_path: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file, token_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "token"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    token_file.write_text("s3cret\n")
    image = [np.zeros((8, 8, 3), np.uint8)]
    with ServerThread(
        [build_reward("jpeg_compressibility")], tls_cert=cert_file, tls_key=key_file, auth_token_file=token_file
    ) as server:
        address = f"grpcs://{server.address}"
        with RewardClient(address, root_certificates=cert_file, auth_token="s3cret") as client:
            client.wait_ready(10, rewards=["jpeg_compressibility"])
            assert client.score("jpeg_compressibility", image).ok
        for token, fragment in ((None, "missing `authorization: Bearer <token>`"), ("wrong", "does not match")):
            with RewardClient(address, root_certificates=cert_file, auth_token=token) as client:
                client.wait_ready(10)  # health stays open without the token, for load balancers and probes
                with pytest.raises(RewardServiceError) as caught:
                    client.list_rewards()
                assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert fragment in caught.value.message
                with pytest.raises(RewardServiceError) as caught:
                    list(client.score_stream("jpeg_compressibility", image))
                assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        with RewardClient(server.address, timeout=2) as plaintext, pytest.raises(RewardServiceError) as caught:
            plaintext.list_rewards()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE


class LoadsOnSignal(JpegSize):
    """jpeg_compressibility under another name, whose load() waits for ``release`` and then fails if told to."""

    def __init__(self, name: str, release: threading.Event, error: str | None = None) -> None:
        super().__init__(name, sign=-1)
        self.release = release
        self.error = error

    def load(self) -> None:
        if not self.release.wait(30):
            raise TimeoutError("the test never released the load")
        if self.error:
            raise RuntimeError(self.error)


def test_rewards_load_in_the_background_and_a_failed_one_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    slow = LoadsOnSignal("slow_model", release)
    broken = LoadsOnSignal("broken_model", release, error="weights not found at /models/missing.safetensors")
    image = np.zeros((8, 8, 3), np.uint8)
    with ServerThread([slow, broken], wait_loaded=False) as server, RewardClient(server.address) as client:
        # listening at once: health answers, the catalogue is complete, nothing scores yet
        assert health_status(server.address, "reward/slow_model") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_status(server.address, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert [info.name for info in client.list_rewards()] == ["broken_model", "slow_model"]
        with pytest.raises(RewardServiceError) as loading:
            client.score("slow_model", [image])
        assert loading.value.code == grpc.StatusCode.UNAVAILABLE
        assert "'slow_model' is still loading (health service 'reward/slow_model')" in loading.value.message
        with client.open_stream() as stream:  # in a stream, each item gets the same answer
            stream.send("slow_model", [image, image], ids=["a", "b"])
            stream.close()
            assert {r.code for r in stream.results()} == {grpc.StatusCode.UNAVAILABLE}

        release.set()
        assert server.server is not None
        future = asyncio.run_coroutine_threadsafe(server.server.wait_loaded(), server._loop)  # type: ignore[arg-type]
        assert future.result(30) == {
            "broken_model": "failed to load: RuntimeError: weights not found at /models/missing.safetensors"
        }
        client.wait_ready(timeout=10, rewards=["slow_model"])
        load_errors = {info.name: info.load_error for info in client.list_rewards()}
        assert load_errors == {
            "broken_model": "failed to load: RuntimeError: weights not found at /models/missing.safetensors",
            "slow_model": "",
        }
        assert health_status(server.address, "") == SERVING  # the server serves what loaded
        assert health_status(server.address, "reward/broken_model") == health_pb2.HealthCheckResponse.NOT_SERVING
        (scored,) = client.score("slow_model", [image]).items
        assert scored.ok
        with pytest.raises(RewardServiceError) as failed:
            client.score("broken_model", [image])
        assert failed.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "failed to load: RuntimeError: weights not found at /models/missing.safetensors" in failed.value.message
    assert "reward failed to load" in caplog.text
