"""Every bad input gets the right status code and a message naming the field; the server stays up.

These tests talk protobuf directly, below the client library, because the client would refuse most of these
inputs before they reach the wire.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image

from clients._wire import encode_png
from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
from clients.generated.ddpo.reward.v1 import reward_pb2_grpc as pb_grpc
from tests.support import PromptLength, ServerProcess, ServerThread

OK = grpc.StatusCode.OK.value[0]
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


def raw(array: np.ndarray, **overrides: int) -> pb.Image:
    height, width, channels = array.shape
    fields = {"height": height, "width": width, "channels": channels, "dtype": pb.DTYPE_UINT8, **overrides}
    return pb.Image(raw=pb.RawImage(data=array.tobytes(), **fields))


def encoded(data: bytes, image_format: int = pb.IMAGE_FORMAT_UNSPECIFIED) -> pb.Image:
    return pb.Image(encoded=pb.EncodedImage(data=data, format=image_format))


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


GOOD = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)

# (case, image, expected message fragment); all are INVALID_ARGUMENT for jpeg_compressibility
BAD_IMAGES = [
    (
        "float32 dtype",
        pb.Image(
            raw=pb.RawImage(
                data=GOOD.astype(np.float32).tobytes(), height=16, width=24, channels=3, dtype=pb.DTYPE_FLOAT32
            )
        ),
        "dtype is DTYPE_FLOAT32",
    ),
    ("unknown dtype", raw(GOOD, dtype=7), "dtype is unknown value 7"),
    (
        "too few bytes",
        pb.Image(raw=pb.RawImage(data=GOOD.tobytes()[:100], height=16, width=24, channels=3)),
        "data has 100 bytes; a 16x24x3 uint8 image (HWC) needs exactly 1152",
    ),
    ("too many bytes", raw(GOOD, height=15), "needs exactly 1080"),
    ("wrong channels", raw(GOOD[..., :2].copy()), "has 2 channels; this reward accepts 3"),
    ("zero height", raw(np.zeros((0, 24, 3), np.uint8)), "has a zero dimension"),
    ("zero channels", raw(GOOD, channels=0), "has a zero dimension"),
    ("over the maximum size", raw(np.zeros((5000, 1, 3), np.uint8)), "outside the accepted range"),
    ("corrupt PNG", encoded(encode_png(GOOD)[:60]), "cannot decode PNG"),
    ("corrupt JPEG", encoded(jpeg_bytes(GOOD)[:40] + b"\x00" * 10), "cannot decode JPEG"),
    ("not an image", encoded(b"GIF89a........"), "is not a PNG or JPEG file"),
    (
        "format mismatch",
        encoded(encode_png(GOOD), pb.IMAGE_FORMAT_JPEG),
        "says IMAGE_FORMAT_JPEG but the bytes are PNG",
    ),
    (
        "encoded over the maximum",
        encoded(encode_png(np.zeros((1, 5000, 3), np.uint8))),
        "exceeds the maximum 4096x4096",
    ),
    ("grayscale PNG to an RGB reward", encoded(encode_png(GOOD[..., :1].copy())), "has 1 channels"),
    ("no image", pb.Image(), "image is empty"),
]


@pytest.fixture(scope="module")
def stub(jpeg_server: ServerProcess) -> Iterator[pb_grpc.RewardServiceStub]:
    with grpc.insecure_channel(
        jpeg_server.address,
        options=[("grpc.max_receive_message_length", 1 << 28), ("grpc.max_send_message_length", 1 << 28)],
    ) as channel:
        yield pb_grpc.RewardServiceStub(channel)


@pytest.mark.parametrize(("case", "image", "fragment"), BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_bad_image_fails_alone_with_invalid_argument(
    stub: pb_grpc.RewardServiceStub, case: str, image: pb.Image, fragment: str
) -> None:
    items = [
        pb.Item(id="good-1", image=raw(GOOD)),
        pb.Item(id="bad", image=image),
        pb.Item(id="good-2", image=encoded(encode_png(GOOD))),
    ]
    response = stub.Score(pb.ScoreRequest(reward="jpeg_compressibility", items=items), timeout=30)
    good_1, bad, good_2 = response.results
    assert (good_1.id, bad.id, good_2.id) == ("good-1", "bad", "good-2")
    assert bad.status.code == INVALID, case
    assert bad.status.message.startswith("items[1].image"), bad.status.message
    assert fragment in bad.status.message
    assert good_1.status.code == good_2.status.code == OK
    assert good_1.score == good_2.score < 0  # the same pixels, raw and PNG-encoded


def test_unknown_and_empty_reward_names_are_not_found(stub: pb_grpc.RewardServiceStub) -> None:
    for reward, fragment in (
        ("jpeg_size", "unknown reward 'jpeg_size'; this server offers: jpeg_compressibility"),
        ("", "reward is empty"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Score(pb.ScoreRequest(reward=reward, items=[pb.Item(id="a", image=raw(GOOD))]), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert fragment in caught.value.details()


def test_missing_or_duplicate_ids_fail_alone(stub: pb_grpc.RewardServiceStub) -> None:
    items = [pb.Item(id=i, image=raw(GOOD)) for i in ("a", "b", "a", "")]
    results = stub.Score(pb.ScoreRequest(reward="jpeg_compressibility", items=items), timeout=10).results
    assert [(r.id, r.status.code) for r in results] == [("a", OK), ("b", OK), ("a", INVALID), ("", INVALID)]
    assert results[2].status.message.startswith("items[2].id 'a' is a duplicate; ids must be unique")
    assert results[3].status.message.startswith("items[3].id is empty")


def test_in_a_stream_bad_items_fail_alone(stub: pb_grpc.RewardServiceStub) -> None:
    messages = [
        pb.ScoreStreamRequest(
            reward="jpeg_compressibility",
            items=[pb.Item(id="ok-0", image=raw(GOOD)), pb.Item(id="bad-bytes", image=BAD_IMAGES[2][1])],
        ),
        pb.ScoreStreamRequest(reward="no_such_reward", items=[pb.Item(id="unknown-reward", image=raw(GOOD))]),
        pb.ScoreStreamRequest(
            reward="jpeg_incompressibility",
            items=[pb.Item(id="corrupt", image=BAD_IMAGES[8][1]), pb.Item(id="ok-1", image=raw(GOOD))],
        ),
    ]
    results = {r.id: r for response in stub.ScoreStream(iter(messages), timeout=30) for r in response.results}
    assert sorted(results) == ["bad-bytes", "corrupt", "ok-0", "ok-1", "unknown-reward"]
    assert results["ok-0"].status.code == results["ok-1"].status.code == OK
    assert results["ok-1"].score > 0
    assert results["ok-0"].score == -results["ok-1"].score
    assert results["bad-bytes"].status.code == INVALID
    assert results["bad-bytes"].status.message.startswith("messages[0].items[1].image.raw.data has 100 bytes")
    assert results["corrupt"].status.code == INVALID
    assert "cannot decode PNG" in results["corrupt"].status.message
    assert results["unknown-reward"].status.code == NOT_FOUND
    assert "unknown reward 'no_such_reward'" in results["unknown-reward"].status.message


def test_duplicate_id_in_a_stream_fails_alone_naming_the_id(stub: pb_grpc.RewardServiceStub) -> None:
    messages = [
        pb.ScoreStreamRequest(reward="jpeg_compressibility", items=[pb.Item(id="x", image=raw(GOOD))]),
        pb.ScoreStreamRequest(reward="no_such_reward", items=[pb.Item(id="x", image=raw(GOOD))]),
        pb.ScoreStreamRequest(
            reward="jpeg_compressibility", items=[pb.Item(id="x", image=raw(GOOD)), pb.Item(id="y", image=raw(GOOD))]
        ),
    ]
    results = [r for response in stub.ScoreStream(iter(messages), timeout=30) for r in response.results]
    assert sorted((r.id, r.status.code) for r in results) == [("x", OK), ("x", INVALID), ("x", INVALID), ("y", OK)]
    duplicates = sorted(r.status.message for r in results if r.status.code == INVALID)
    assert duplicates[0].startswith("messages[1].items[0].id 'x' is a duplicate")
    assert duplicates[1].startswith("messages[2].items[0].id 'x' is a duplicate")


def test_server_is_still_up_after_bad_input(stub: pb_grpc.RewardServiceStub, jpeg_server: ServerProcess) -> None:
    assert jpeg_server.proc is not None
    assert jpeg_server.proc.poll() is None
    names = [spec.name for spec in stub.ListRewards(pb.ListRewardsRequest(), timeout=10).rewards]
    assert names == ["jpeg_compressibility", "jpeg_incompressibility"]


def test_missing_or_empty_prompt_is_rejected_where_required() -> None:
    small = GOOD[:8, :8]
    with ServerThread([PromptLength()]) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        items = [
            pb.Item(id="no-prompt", image=raw(small)),
            pb.Item(id="empty", image=raw(small), prompt=""),
            pb.Item(id="ok", image=raw(small), prompt="a red circle"),
        ]
        results = stub.Score(pb.ScoreRequest(reward="prompt_length", items=items), timeout=10).results
    assert [r.status.code for r in results] == [INVALID, INVALID, OK]
    assert results[0].status.message == (
        "items[0].prompt is missing; reward 'prompt_length' requires the prompt the image was generated from"
    )
    assert "items[1].prompt is empty" in results[1].status.message
    assert results[2].score == len("a red circle")
