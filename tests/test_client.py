"""The client library: input checks before anything is sent, the asyncio client, errors, and its light imports."""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from clients import (
    AsyncRewardClient,
    AsyncScoreStream,
    EncodedImage,
    ItemsFailedError,
    RewardClient,
    RewardServiceError,
    TritonRewardClient,
    open_client,
)
from clients._wire import checked_items, encode_png, parse_target
from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
from reward_server.rewards import build_reward
from tests.support import ROOT, ServerProcess

IMAGE = np.zeros((8, 8, 3), np.uint8)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"images": [IMAGE.astype(np.float32)]}, ValueError, "images[0] has dtype float32; images must be uint8"),
        ({"images": [IMAGE[..., 0]]}, ValueError, "images[0] has shape (8, 8); expected (H, W, C)"),
        ({"images": [np.zeros((3, 8, 8), np.uint8)]}, ValueError, "is it CHW?"),
        ({"images": [np.zeros((0, 8, 3), np.uint8)]}, ValueError, "every dimension must be > 0"),
        ({"images": np.zeros((8, 8, 3), np.uint8)}, ValueError, "a batch array must be (N, H, W, C)"),
        ({"images": ["not an image"]}, TypeError, "images[0] must be a numpy array or EncodedImage, got str"),
        ({"images": [IMAGE, IMAGE], "prompts": ["only one"]}, ValueError, "prompts has 1 entries for 2 images"),
        ({"images": [IMAGE], "prompts": "a cat"}, TypeError, "prompts must be a list"),
        ({"images": [IMAGE], "prompts": [3]}, TypeError, "prompts[0] must be a str or None"),
        ({"images": [IMAGE, IMAGE], "ids": ["a", "a"]}, ValueError, "ids[1] 'a' is a duplicate"),
        ({"images": [IMAGE], "ids": [""]}, ValueError, "ids[0] must be a non-empty string"),
        ({"images": [IMAGE], "metadata": [{"x": object()}]}, ValueError, "metadata[0] must be JSON-like"),
        ({"images": [IMAGE], "encoding": "webp"}, ValueError, "encoding must be 'raw' or 'png'"),
        ({"images": [IMAGE], "reward": ""}, ValueError, "reward must be a non-empty reward name"),
    ],
)
def test_client_rejects_bad_input_before_sending(
    kwargs: dict[str, object], error: type[Exception], fragment: str
) -> None:
    arguments = {"reward": "jpeg_compressibility", **kwargs}
    # nothing listens on port 9: a check that fails must raise before anything is sent
    with RewardClient("127.0.0.1:9") as client, pytest.raises(error) as caught:
        client.score(**arguments)  # type: ignore[arg-type]
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("server", "fragment"),
    [
        ("localhost", "must look like HOST:PORT"),
        ("http://h:1", "scheme must be grpc:// or grpcs://"),
        ("h:99999", "must look like HOST:PORT"),
    ],
)
def test_bad_server_addresses(server: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="server") as caught:
        RewardClient(server)
    assert fragment in str(caught.value)
    assert parse_target("grpcs://example.org:443").tls
    assert not parse_target("127.0.0.1:1").tls


def test_triton_refuses_weights_before_sending() -> None:
    """Triton has no per-request composite: the client takes ``weights`` (the API every client has) and refuses it."""
    pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (pip install 'ddpo[triton]')")
    # nothing listens on port 9: the refusal must come before anything is sent
    for client in (TritonRewardClient("triton://127.0.0.1:9"), open_client("triton://127.0.0.1:9")):
        with client, pytest.raises(ValueError, match=r"weights .* are not available through Triton: call each reward"):
            client.score("jpeg_compressibility", [IMAGE], weights={"jpeg_compressibility": 1.0})


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_encoder_is_lossless(channels: int) -> None:
    image = np.random.default_rng(channels).integers(0, 256, (13, 29, channels), dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(image))))
    np.testing.assert_array_equal(decoded.reshape(image.shape), image)


def test_spliced_wire_bytes_parse_as_the_plain_protobuf_request() -> None:
    """WireBatch.serialize splices raw pixels in by hand; both request types must parse it to the same items."""
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(1, 1, 3), (300, 200, 3), (5, 7, 4)]]
    png = EncodedImage(encode_png(images[0]), "png")
    batch = checked_items(
        "jpeg_compressibility",
        [images[0], png, images[1], images[2]],
        prompts=[None, "a cat", "", "a dog"],
        metadata=[None, {"k": [1, "two"]}, None, {"nested": {"x": True}}],
        ids=["a", "b", "c", "d"],
        encoding="raw",
        taken=set(),
    )
    expected = pb.ScoreRequest(reward="jpeg_compressibility")
    for item_id, image, prompt in zip(
        "abcd", [images[0], None, images[1], images[2]], [None, "a cat", "", "a dog"], strict=True
    ):
        item = expected.items.add(id=item_id, prompt=prompt)
        if image is None:
            item.image.encoded.data, item.image.encoded.format = png.data, pb.IMAGE_FORMAT_PNG
        else:
            height, width, channels = image.shape
            item.image.raw.CopyFrom(
                pb.RawImage(data=image.tobytes(), height=height, width=width, channels=channels, dtype=pb.DTYPE_UINT8)
            )
    expected.items[1].metadata.update({"k": [1, "two"]})
    expected.items[3].metadata.update({"nested": {"x": True}})
    wire = batch.serialize()
    assert pb.ScoreRequest.FromString(wire) == expected
    assert pb.ScoreStreamRequest.FromString(wire) == pb.ScoreStreamRequest.FromString(expected.SerializeToString())
    assert len(wire) < len(expected.SerializeToString()) + 64  # a few bytes of extra headers, no second copy


def test_unreachable_server_gives_unavailable_after_bounded_retries() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before use: nothing listens there
    started = time.monotonic()
    with RewardClient(f"127.0.0.1:{port}", timeout=20) as client:
        with pytest.raises(RewardServiceError) as caught:
            client.list_rewards()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert caught.value.method == "ListRewards"
        assert time.monotonic() - started < 15  # gave up after its retries, well before the deadline
        with pytest.raises(TimeoutError, match=r"not ready after 0\.5s"):
            client.wait_ready(timeout=0.5)


def test_failed_items_never_become_numbers(jpeg_server: ServerProcess) -> None:
    with RewardClient(jpeg_server.address) as client:
        batch = client.score("jpeg_compressibility", [IMAGE, np.zeros((8, 8, 4), np.uint8)], ids=["good", "rgba"])
        with pytest.raises(RewardServiceError) as caught:
            client.wait_ready(5, rewards=["nope"])
    assert not batch.ok
    assert [r.id for r in batch.failed] == ["rgba"]
    assert np.isnan(batch.failed[0].score)
    assert batch.failed[0].code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ItemsFailedError, match=r"rgba: INVALID_ARGUMENT: items\[1\]\.image\.raw: has 4 channels"):
        _ = batch.scores
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_asyncio_client_scores_streams_and_lists(
    jpeg_server: ServerProcess, photo_batch: npt.NDArray[np.uint8]
) -> None:
    expected = build_reward("jpeg_incompressibility").score(list(photo_batch), [None] * 6, [{}] * 6).scores

    async def main() -> tuple[object, ...]:
        async with AsyncRewardClient(jpeg_server.address) as client:
            await client.wait_ready(10, rewards=["jpeg_incompressibility"])
            names = [r.name for r in await client.list_rewards()]
            unary, png = await asyncio.gather(
                client.score("jpeg_incompressibility", photo_batch),
                client.score("jpeg_incompressibility", photo_batch, encoding="png"),
            )
            async with client.open_stream() as stream:
                ids = [
                    *await stream.send("jpeg_incompressibility", photo_batch[:2]),
                    *await stream.send("jpeg_incompressibility", photo_batch[2:]),
                ]
                await stream.close()
                streamed = {r.id: r.score async for r in stream.results()}
            with pytest.raises(RewardServiceError) as caught:
                await client.score("unknown", photo_batch)
            return names, unary, png, ids, streamed, caught.value.code

    names, unary, png, ids, streamed, code = asyncio.run(main())
    assert names == ["jpeg_compressibility", "jpeg_incompressibility"]
    np.testing.assert_array_equal(unary.scores, expected)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(png.scores, expected)  # type: ignore[attr-defined]
    np.testing.assert_array_equal([streamed[i] for i in ids], expected)  # type: ignore[index, attr-defined]
    assert code == grpc.StatusCode.NOT_FOUND


def test_client_package_imports_no_server_or_heavy_modules() -> None:
    code = (
        "import sys, clients, clients.score_cli; "
        "heavy = [m for m in ('torch', 'PIL', 'reward_server', 'prometheus_client', 'yaml') if m in sys.modules]; "
        "print(heavy)"
    )
    output = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "[]"


def test_a_reader_that_starts_before_close_ends_cleanly(
    jpeg_server: ServerProcess, photo_batch: npt.NDArray[np.uint8]
) -> None:
    """Results read on another thread while sending (as the trainer does): every answer arrives before close()."""
    got: list[float] = []
    errors: list[BaseException] = []
    all_answered = threading.Event()
    with RewardClient(jpeg_server.address) as client, client.open_stream() as stream:

        def read() -> None:
            try:
                for result in stream.results():
                    got.append(result.score)
                    if len(got) == len(photo_batch):
                        all_answered.set()
            except BaseException as error:
                errors.append(error)

        reader = threading.Thread(target=read)
        reader.start()
        stream.send("jpeg_compressibility", photo_batch)
        assert all_answered.wait(30)
        stream.close()  # the server now ends the stream: no answer is missing
        reader.join(30)
    assert not errors
    assert len(got) == len(photo_batch)


def test_asyncio_reader_that_starts_before_close_ends_cleanly(
    jpeg_server: ServerProcess, photo_batch: npt.NDArray[np.uint8]
) -> None:
    async def main() -> list[float]:
        got: list[float] = []
        all_answered = asyncio.Event()

        async def read(stream: AsyncScoreStream) -> None:
            async for result in stream.results():
                got.append(result.score)
                if len(got) == len(photo_batch):
                    all_answered.set()  # the reader then waits on the next read

        async with AsyncRewardClient(jpeg_server.address) as client, client.open_stream() as stream:
            reader = asyncio.create_task(read(stream))
            await stream.send("jpeg_compressibility", photo_batch)
            await asyncio.wait_for(all_answered.wait(), 30)
            await stream.close()
            await asyncio.wait_for(reader, 30)
        return got

    assert len(asyncio.run(main())) == len(photo_batch)


# A stream must end within this after its server dies: well under a bounded wait, whatever the reason.
STREAM_DEATH_BOUND_S = 15.0


def _slow_server() -> ServerProcess:
    """tests/slow_server.py: its only reward, "slow", sleeps 2 s per batch before answering."""
    return ServerProcess(module="tests.slow_server")


def test_a_stream_whose_server_is_killed_before_its_first_answer_ends() -> None:
    """gRPC used to retry the stream transparently, and then it blocked forever, cancel() included."""
    with _slow_server() as server, RewardClient(server.address) as client, client.open_stream() as stream:
        stream.send("slow", np.zeros((2, 8, 8, 3), np.uint8))
        stream.close()
        time.sleep(0.5)  # the batch is being scored: no answer yet
        assert server.proc is not None
        server.proc.kill()
        started = time.monotonic()
        with pytest.raises(RewardServiceError) as raised:
            list(stream.results())
        assert time.monotonic() - started < STREAM_DEATH_BOUND_S
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


def test_an_asyncio_stream_whose_server_is_killed_before_its_first_answer_ends() -> None:
    async def main(address: str, kill: object) -> RewardServiceError:
        async with AsyncRewardClient(address) as client, client.open_stream() as stream:
            await stream.send("slow", np.zeros((2, 8, 8, 3), np.uint8))
            await stream.close()
            await asyncio.sleep(0.5)
            kill()  # type: ignore[operator]
            with pytest.raises(RewardServiceError) as raised:
                await asyncio.wait_for(_drain(stream), STREAM_DEATH_BOUND_S)
            return raised.value

    with _slow_server() as server:
        assert server.proc is not None
        error = asyncio.run(main(server.address, server.proc.kill))
    assert error.code == grpc.StatusCode.UNAVAILABLE


async def _drain(stream: AsyncScoreStream) -> list[float]:
    return [result.score async for result in stream.results()]


def test_the_progress_timeout_counts_only_while_answers_are_owed(jpeg_server: ServerProcess) -> None:
    """A producer slower than the progress timeout is fine; a server that owes answers for longer is not."""
    with RewardClient(jpeg_server.address) as client, client.open_stream(progress_timeout=1.0) as stream:
        for _ in range(3):
            stream.send("jpeg_compressibility", np.zeros((1, 8, 8, 3), np.uint8))
            time.sleep(1.5)  # sampling the next batch takes longer than the progress timeout
        stream.close()
        assert len(list(stream.results())) == 3
    with _slow_server() as server, RewardClient(server.address) as client:
        with client.open_stream(progress_timeout=0.5) as stream:  # the slow reward takes 2 s to answer
            stream.send("slow", np.zeros((1, 8, 8, 3), np.uint8))
            stream.close()
            started = time.monotonic()
            with pytest.raises(RewardServiceError, match=r"no answer for 0.5s with 1 item\(s\) outstanding") as raised:
                list(stream.results())
            assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < STREAM_DEATH_BOUND_S

        async def asyncio_stall(address: str) -> None:
            async with AsyncRewardClient(address) as aio_client, aio_client.open_stream(progress_timeout=0.5) as stream:
                await stream.send("slow", np.zeros((1, 8, 8, 3), np.uint8))
                await stream.close()
                await _drain(stream)

        with pytest.raises(RewardServiceError, match=r"no answer for 0\.5s") as raised:
            asyncio.run(asyncio_stall(server.address))
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
