"""A reward server that no request can upset: item isolation, undecodable bodies, truncated echoes, decoding budgets,
ports in use, a bounded fuzz run and a bounded load run, all against real server processes on loopback."""

from __future__ import annotations

import asyncio
import io
import random
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from clients import AsyncRewardClient, EncodedImage, RewardClient, RewardServiceError
from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
from reward_server.batching import BatchingConfig
from reward_server.config import ServerConfig
from tests.support import DDPO, ROOT, ServerProcess, ServerThread, SlowReward

SERVICE = "/ddpo.reward.v1.RewardService/"
JPEG = ("--rewards", "jpeg_compressibility,jpeg_incompressibility")
# What a request may get back; UNKNOWN and INTERNAL would mean an exception escaped.
EXPECTED_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(*JPEG) as running:
        yield running


def png(height: int, width: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 200, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(height: int, width: int) -> bytes:
    """A PNG whose header claims ``height``x``width`` (a decompression bomb's header), with a token body."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def jpeg_claiming(height: int, width: int) -> bytes:
    """A JPEG whose start-of-frame segment claims ``height``x``width``."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0" + sof + b"\xff\xd9"


def good_items(prefix: str, count: int) -> list[pb.Item]:
    image = np.full((8, 8, 3), 100, np.uint8).tobytes()
    return [
        pb.Item(id=f"{prefix}{i}", image=pb.Image(raw=pb.RawImage(data=image, height=8, width=8, channels=3)))
        for i in range(count)
    ]


def raw_call(channel: grpc.Channel, method: str, response: type) -> grpc.UnaryUnaryMultiCallable:
    """A call that sends bytes as they are: bodies no client library would build."""
    return channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=response.FromString)


def raw_stream(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    return channel.stream_stream(
        SERVICE + "ScoreStream", request_serializer=None, response_deserializer=pb.ScoreStreamResponse.FromString
    )


def stream_results(channel: grpc.Channel, bodies: list[bytes]) -> tuple[dict[str, pb.ScoreResult], grpc.StatusCode]:
    """Send ``bodies`` on one ScoreStream; every result by id, and the stream's final status. A well-formed id is
    answered once; empty and repeated ids (which the fuzz sends) get an error each, so they may repeat."""
    call = raw_stream(channel)(iter(bodies), timeout=60)
    results: dict[str, pb.ScoreResult] = {}
    try:
        for response in call:
            for result in response.results:
                if result.id in results:
                    assert result.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], result
                    assert "empty" in result.status.message or "duplicate" in result.status.message
                results.setdefault(result.id, result)
    except grpc.RpcError:
        pass
    return results, call.code()


def test_a_bad_item_fails_alone_even_when_decoding_would_raise(server: ServerProcess) -> None:
    """Each of these used to end the whole call or stream with UNKNOWN; now each fails its item, naming the field."""
    bad = {
        "png-bomb": pb.Item(id="png-bomb", image=pb.Image(encoded=pb.EncodedImage(data=png_claiming(60000, 60000)))),
        "jpeg-bomb": pb.Item(id="jpeg-bomb", image=pb.Image(encoded=pb.EncodedImage(data=jpeg_claiming(60000, 60000)))),
        "format-99": pb.Item(id="format-99", image=pb.Image(encoded=pb.EncodedImage(data=png(8, 8), format=99))),
        "format-minus-5": pb.Item(
            id="format-minus-5", image=pb.Image(encoded=pb.EncodedImage(data=png(8, 8), format=-5))
        ),
    }
    expected = {
        "png-bomb": "image.encoded: PNG of size 60000x60000 has 3600000000 pixels, over the server's limit",
        "jpeg-bomb": "image.encoded: JPEG of size 60000x60000 has 3600000000 pixels, over the server's limit",
        "format-99": "image.encoded.format is 99, not an ImageFormat value",
        "format-minus-5": "image.encoded.format is -5, not an ImageFormat value",
    }
    with grpc.insecure_channel(server.address) as channel:
        request = pb.ScoreRequest(
            reward="jpeg_compressibility", items=[*good_items("a", 4), *bad.values(), *good_items("b", 4)]
        )
        response = raw_call(channel, "Score", pb.ScoreResponse)(request.SerializeToString(), timeout=60)
        by_id = {r.id: r for r in response.results}
        bodies = [pb.ScoreStreamRequest(reward="jpeg_compressibility", items=good_items("c", 8)).SerializeToString()]
        bodies += [
            pb.ScoreStreamRequest(reward="jpeg_compressibility", items=[item]).SerializeToString()
            for item in bad.values()
        ]
        # composite weights that overflow: a per-request composite in the same stream
        overflow = {"jpeg_compressibility": 1.7e308, "jpeg_incompressibility": -1.7e308}
        bodies.append(
            pb.ScoreStreamRequest(reward="x", weights=overflow, items=good_items("overflow", 1)).SerializeToString()
        )
        bodies.append(
            pb.ScoreStreamRequest(reward="jpeg_compressibility", items=good_items("d", 8)).SerializeToString()
        )
        streamed, code = stream_results(channel, bodies)
    for answers in (by_id, streamed):
        for item_id, fragment in expected.items():
            assert answers[item_id].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert fragment in answers[item_id].status.message
    assert all(by_id[f"{p}{i}"].status.code == 0 for p in "ab" for i in range(4))
    assert all(streamed[f"{p}{i}"].status.code == 0 for p in "cd" for i in range(8))  # before and after: answered
    assert streamed["overflow0"].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "weights: the weighted sum of 'weights' overflows" in streamed["overflow0"].status.message
    assert code == grpc.StatusCode.OK


def nested_struct(depth: int) -> bytes:
    """A google.protobuf.Struct nested ``depth`` levels deep, built as bytes (protobuf refuses to build it)."""

    def field(number: int, payload: bytes) -> bytes:
        return bytes([number << 3 | 2]) + _varint(len(payload)) + payload

    struct_bytes = b""
    for _ in range(depth):
        value = field(5, struct_bytes)  # Value.struct_value
        entry = field(1, b"k") + field(2, value)  # map entry: key, value
        struct_bytes = field(1, entry)  # Struct.fields
    return struct_bytes


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def test_bodies_that_do_not_parse_get_invalid_argument_and_one_log_line(tmp_path: Path) -> None:
    item = good_items("x", 1)[0]
    deep_item = item.SerializeToString() + bytes([4 << 3 | 2]) + _varint(len(nested_struct(200))) + nested_struct(200)
    bodies = {
        "garbage": bytes(random.Random(0).getrandbits(8) for _ in range(300)),
        "truncated": pb.ScoreRequest(reward="jpeg_compressibility", items=good_items("t", 2)).SerializeToString()[:-7],
        "invalid utf-8": b"\x0a\x03\xff\xfe\xfd",  # field 1 (reward), 3 bytes that are not UTF-8
        "nested too deep": b"\x0a\x14jpeg_compressibility" + bytes([2 << 3 | 2]) + _varint(len(deep_item)) + deep_item,
    }
    with ServerProcess(*JPEG) as process, grpc.insecure_channel(process.address) as channel:
        score = raw_call(channel, "Score", pb.ScoreResponse)
        for name, body in bodies.items():
            with pytest.raises(grpc.RpcError) as raised:
                score(body, timeout=30)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert "the request body is not a valid ddpo.reward.v1.ScoreRequest" in raised.value.details()
            assert len(raised.value.details()) < 300
        for _ in range(30):  # many bad stream bodies: the log must not grow with them
            good = pb.ScoreStreamRequest(reward="jpeg_compressibility", items=good_items("g", 2)).SerializeToString()
            results, code = stream_results(
                channel, [good, bodies["garbage"], good.replace(b"g0", b"h0").replace(b"g1", b"h1")]
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert {"g0", "g1", "h0", "h1"} == set(results)  # the good messages around it were answered
    log = process.stderr
    assert log.count("undecodable request body") == 1  # rate-limited: one line a minute
    assert "Traceback" not in log


def test_strings_quoted_from_a_request_are_truncated(server: ServerProcess) -> None:
    name = "r" * 16384
    with RewardClient(server.address) as client, pytest.raises(RewardServiceError) as raised:
        client.score(name, [np.zeros((8, 8, 3), np.uint8)])
    assert raised.value.code == grpc.StatusCode.NOT_FOUND  # not RESOURCE_EXHAUSTED from an oversized message
    assert f"unknown reward {'r' * 64!r}"[:-1] + "…'" in raised.value.message
    assert len(raised.value.message) < 500


def test_decoding_budgets_per_image_and_per_request() -> None:
    config = ServerConfig(port=0, max_image_pixels=100 * 100, max_request_decoded_mb=1, max_decoded_mb_in_flight=2)
    with (
        ServerThread([SlowReward("mean", delay=0.0)], **_fields(config)) as server,
        RewardClient(server.address) as client,
    ):
        too_big = client.score("mean", [EncodedImage(png(128, 128))]).items[0]
        assert too_big.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "has 16384 pixels, over the server's limit of 10000 per image (max_image_pixels)" in too_big.message
        # 100x100 PNGs decode to 40 KB each at the budgets' 4 bytes a pixel: 26 fit in 1 MB, the rest do not
        batch = client.score("mean", [EncodedImage(png(100, 100))] * 30)
    codes = [item.code for item in batch.items]
    assert codes[:26] == [grpc.StatusCode.OK] * 26
    assert codes[26:] == [grpc.StatusCode.INVALID_ARGUMENT] * 4
    assert "decode to more than 1 MB (max_request_decoded_mb)" in batch.items[-1].message


def _fields(config: ServerConfig) -> dict[str, object]:
    return {
        "max_image_pixels": config.max_image_pixels,
        "max_request_decoded_mb": config.max_request_decoded_mb,
        "max_decoded_mb_in_flight": config.max_decoded_mb_in_flight,
    }


def test_decoded_bytes_in_flight_wait_for_room_and_nothing_is_lost() -> None:
    """With room for two 512x512 images in flight, a stream of 12 is decoded two at a time: the slow reward never
    sees more than two at once, and every item is answered."""
    slow = SlowReward("slow", delay=0.2)
    images = [np.full((512, 512, 3), i, np.uint8) for i in range(12)]
    with (
        ServerThread(
            [(slow, BatchingConfig(max_batch_size=8))], max_request_decoded_mb=1, max_decoded_mb_in_flight=2
        ) as server,
        RewardClient(server.address) as client,
        client.open_stream() as stream,
    ):
        for image in images:
            stream.send("slow", [image], encoding="png")
        stream.close()
        results = list(stream.results())
    assert sorted(r.id for r in results) == sorted(str(i) for i in range(12))
    assert all(r.ok for r in results)
    assert max(slow.batch_sizes) <= 2  # 512x512 at 4 bytes a pixel is 1 MB: two fit in the 2 MB in flight
    too_big = ServerConfig(port=0, max_request_decoded_mb=1, max_decoded_mb_in_flight=1)
    with (
        ServerThread([SlowReward("slow", delay=0.0)], **_fields(too_big)) as server,
        RewardClient(server.address) as client,
    ):
        item = client.score("slow", [np.zeros((1024, 1024, 3), np.uint8)]).items[0]
    assert item.code == grpc.StatusCode.INVALID_ARGUMENT  # 3 MB can never fit in 1 MB: not a retry hint
    assert "more than the server ever holds (1 MB, max_decoded_mb_in_flight)" in item.message


def test_a_port_in_use_is_an_error_for_every_frontend(server: ServerProcess, tmp_path: Path) -> None:
    def ddpo(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*DDPO, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)

    port = server.address.rsplit(":", 1)[1]
    second = ddpo("serve", "--rewards", "jpeg_compressibility", "--port", port)
    assert second.returncode == 1
    assert f"ddpo serve: the gRPC port 127.0.0.1:{port} is already in use" in second.stderr
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = str(held.getsockname()[1])
        metrics = ddpo("serve", "--rewards", "jpeg_compressibility", "--port", "0", "--metrics-port", busy)
        assert metrics.returncode == 1
        assert f"the metrics port 127.0.0.1:{busy} is already in use" in metrics.stderr
        pytriton = ddpo("serve", "--frontend", "pytriton", "--rewards", "jpeg_compressibility", "--port", busy)
        assert pytriton.returncode == 1
        assert f"127.0.0.1:{busy} is already in use" in pytriton.stderr
        repository = tmp_path / "repository"
        assert ddpo("triton", "export", "--rewards", "jpeg_compressibility", "--out", str(repository)).returncode == 0
        triton = ddpo("triton", "serve", f"--model-repository={repository}", f"--grpc-port={busy}")
        assert triton.returncode == 1
        assert f"127.0.0.1:{busy} is already in use" in triton.stderr


def test_reflection_advertises_admin_only_when_enabled(tmp_path: Path) -> None:
    (tmp_path / "admin").write_text("admin-token\n")
    for args, advertised in (((), False), (("--admin-token-file", str(tmp_path / "admin")), True)):
        with ServerProcess(*JPEG, *args) as process, grpc.insecure_channel(process.address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (listed,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
        services = {service.name for service in listed.list_services_response.service}
        assert ("ddpo.reward.v1.RewardAdmin" in services) is advertised


# --------------------------------------------------------------------------- fuzz and load


def _mutations(rng: random.Random, valid: bytes) -> bytes:
    """A body mutated at random: random bytes, truncated, bit-flipped, or a valid one."""
    choice = rng.randrange(4)
    if choice == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 400)))
    if choice == 1:
        return valid[: rng.randrange(len(valid))]
    if choice == 2:
        flipped = bytearray(valid)
        for _ in range(rng.randrange(1, 8)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    return valid


def _bad_values(rng: random.Random, prefix: str) -> pb.ScoreStreamRequest:
    """A well-formed message with bad values."""
    item = pb.Item(id=rng.choice(["", "x", prefix + "v"]))
    kind = rng.randrange(5)
    if kind == 0:
        item.image.raw.CopyFrom(
            pb.RawImage(
                data=b"\0" * rng.randrange(200),
                height=rng.choice([0, 1, 8, 70000]),
                width=rng.randrange(0, 20),
                channels=rng.randrange(0, 6),
                dtype=rng.randrange(-2, 5),
            )
        )
    elif kind == 1:
        item.image.encoded.CopyFrom(
            pb.EncodedImage(
                data=rng.choice([png(8, 8), png_claiming(70000, 3), b"\xff\xd8junk"]), format=rng.randrange(-5, 100)
            )
        )
    elif kind == 2:
        item.prompt = "p" * rng.randrange(0, 5000)
    weights = {}
    if kind == 3:
        weights = {
            rng.choice(["jpeg_compressibility", "nope", "r" * 3000]): rng.choice(
                [float("nan"), float("inf"), 1e308, -1.0]
            )
        }
    reward = rng.choice(["jpeg_compressibility", "", "unknown", "z" * 20000])
    return pb.ScoreStreamRequest(reward=reward, items=[item], weights=weights)


def test_a_bounded_fuzz_run_finds_the_server_alive_and_answering(server: ServerProcess) -> None:
    rng = random.Random(15)
    valid = pb.ScoreRequest(reward="jpeg_compressibility", items=good_items("v", 3)).SerializeToString()
    codes: dict[grpc.StatusCode, int] = {}
    sent = 0
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(server.address) as channel:
        score = raw_call(channel, "Score", pb.ScoreResponse)
        while time.monotonic() < deadline and sent < 2000:
            body = _mutations(rng, valid) if rng.random() < 0.6 else _bad_values(rng, "u").SerializeToString()
            try:
                score(body, timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
            codes[code] = codes.get(code, 0) + 1
            sent += 1
        for stream_index in range(20):
            good = [
                pb.ScoreStreamRequest(reward="jpeg_compressibility", items=good_items(f"s{stream_index}-{i}-", 2))
                for i in range(4)
            ]
            bodies = []
            for i, message in enumerate(good):
                bodies.append(message.SerializeToString())
                fuzzed = _bad_values(rng, f"f{stream_index}-{i}-").SerializeToString()
                bodies.append(fuzzed if rng.random() < 0.5 else _mutations(rng, fuzzed))
            results, code = stream_results(channel, bodies)
            codes[code] = codes.get(code, 0) + 1
            for message in good:  # the good items of the same stream were answered, with scores
                for item in message.items:
                    assert results[item.id].status.code == 0, results[item.id]
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert set(codes) <= EXPECTED_CODES, codes
    assert server.proc is not None
    assert server.proc.poll() is None  # alive
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert sent >= 500


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_bounded_load_run_loses_and_doubles_nothing(server: ServerProcess) -> None:
    """64 concurrent streams for 10 s: every id answered exactly once, and the server's memory stays bounded."""
    assert server.proc is not None
    rss_before = _rss_mb(server.proc.pid)
    image = np.full((64, 64, 3), 7, np.uint8)

    async def one_stream(client: AsyncRewardClient, index: int, until: float) -> tuple[int, int]:
        sent, answered = 0, set()
        async with client.open_stream() as stream:
            while time.monotonic() < until:
                await stream.send("jpeg_compressibility", [image] * 4, ids=[f"{index}-{sent + i}" for i in range(4)])
                sent += 4
                await asyncio.sleep(0.05)
            await stream.close()
            async for result in stream.results():
                assert result.id not in answered
                assert result.ok
                answered.add(result.id)
        return sent, len(answered)

    async def main() -> list[tuple[int, int]]:
        until = time.monotonic() + 10
        async with AsyncRewardClient(server.address) as client:
            return await asyncio.gather(*(one_stream(client, i, until) for i in range(64)))

    counts = asyncio.run(main())
    assert all(sent == answered for sent, answered in counts)
    assert sum(sent for sent, _ in counts) > 1000
    assert _rss_mb(server.proc.pid) < rss_before + 300  # the queues and buffers drained


def test_decoding_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing, validation and decoding run in the decoding threads, never on the thread of the event loop (which
    then answered health checks only after seconds of PNG decoding)."""
    import threading

    from reward_server import service, wire

    threads: set[str] = set()
    real_decode, real_parse = wire.decode_item, service.RewardServicer._parse

    def decode(*args: object) -> wire.DecodedItem:
        threads.add(threading.current_thread().name)
        return real_decode(*args)  # type: ignore[arg-type]

    def parse(self: service.RewardServicer, *args: object) -> object:
        threads.add(threading.current_thread().name)
        return real_parse(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(service, "decode_item", decode)
    monkeypatch.setattr(service.RewardServicer, "_parse", parse)
    with ServerThread([SlowReward("mean", delay=0.0)]) as server, RewardClient(server.address) as client:
        client.score("mean", [EncodedImage(png(64, 64)), np.zeros((8, 8, 3), np.uint8)])
        with client.open_stream() as stream:
            stream.send("mean", [EncodedImage(png(32, 32))])
            stream.close()
            assert len(list(stream.results())) == 1
        loop_thread = server._thread.name
    assert threads
    assert all(name.startswith("decode") for name in threads), threads
    assert loop_thread not in threads
