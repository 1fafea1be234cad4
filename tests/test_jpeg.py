"""JPEG (in)compressibility equals an independent Pillow computation, in process and through the real server."""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from clients import EncodedImage, RewardClient
from reward_server.rewards import build_reward
from tests.support import ServerProcess


def pillow_jpeg_kb(image: npt.NDArray[np.uint8]) -> float:
    """The paper's definition, written out independently: Pillow JPEG at quality 95, size in kB."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def synthetic_images() -> list[npt.NDArray[np.uint8]]:
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, 96, dtype=np.float64)
    checker = ((np.indices((64, 64)).sum(0) // 8) % 2 * 255).astype(np.uint8)
    return [
        np.zeros((64, 64, 3), np.uint8),
        np.full((33, 17, 3), 200, np.uint8),
        np.stack([np.outer(np.ones(96), x)] * 3, -1).astype(np.uint8),
        rng.integers(0, 256, (80, 120, 3), dtype=np.uint8),
        np.repeat(checker[..., None], 3, -1),
        rng.integers(0, 256, (1, 1, 3), dtype=np.uint8),
    ]


def test_in_process_reward_equals_pillow(photos: dict[str, npt.NDArray[np.uint8]]) -> None:
    images = [*photos.values(), *synthetic_images()]
    expected = np.array([pillow_jpeg_kb(image) for image in images])
    compressibility = build_reward("jpeg_compressibility").score(images, [None] * len(images), [{}] * len(images))
    incompressibility = build_reward("jpeg_incompressibility").score(images, [None] * len(images), [{}] * len(images))
    np.testing.assert_array_equal(compressibility.scores, -expected)
    np.testing.assert_array_equal(incompressibility.scores, expected)
    assert expected.min() > 0
    assert len(set(expected.tolist())) > len(images) // 2


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_server_scores_equal_pillow(
    jpeg_server: ServerProcess, photos: dict[str, npt.NDArray[np.uint8]], encoding: str
) -> None:
    images = [*photos.values(), *synthetic_images()]  # mixed sizes in one batch
    expected = np.array([pillow_jpeg_kb(image) for image in images])
    with RewardClient(jpeg_server.address) as client:
        compressibility = client.score("jpeg_compressibility", images, encoding=encoding)  # type: ignore[arg-type]
        incompressibility = client.score("jpeg_incompressibility", images, encoding=encoding)  # type: ignore[arg-type]
    np.testing.assert_array_equal(compressibility.scores, -expected)
    np.testing.assert_array_equal(incompressibility.scores, expected)


def test_server_scores_jpeg_files_after_decoding(
    jpeg_server: ServerProcess, photos: dict[str, npt.NDArray[np.uint8]]
) -> None:
    """An encoded JPEG is decoded by the server; its score is the re-encoded size of the decoded pixels."""
    files, decoded = [], []
    for image in photos.values():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=80)
        files.append(EncodedImage(buffer.getvalue(), "jpeg"))
        decoded.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    with RewardClient(jpeg_server.address) as client:
        scores = client.score("jpeg_incompressibility", files).scores
    np.testing.assert_array_equal(scores, [pillow_jpeg_kb(image) for image in decoded])


def test_batch_array_and_list_give_the_same_scores(
    jpeg_server: ServerProcess, photo_batch: npt.NDArray[np.uint8]
) -> None:
    with RewardClient(jpeg_server.address) as client:
        from_array = client.score("jpeg_compressibility", photo_batch).scores
        from_list = client.score("jpeg_compressibility", list(photo_batch)).scores
    np.testing.assert_array_equal(from_array, from_list)
    np.testing.assert_array_equal(from_array, [-pillow_jpeg_kb(image) for image in photo_batch])
