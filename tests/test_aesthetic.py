"""The LAION aesthetic reward: the real published head, a tiny CLIP backbone built from a config, the real server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from clients import RewardClient
from reward_server.rewards import build_reward
from reward_server.rewards.aesthetic import HEAD_SHA256, Aesthetic, clip_pixels, fetch_head, load_head
from tests.support import HEAD, ServerProcess, ServerThread, needs_head


def affine_form(head_file: Path) -> tuple[npt.NDArray[np.float64], float]:
    """The head as w·x + b, composed from the file's tensors in float64 (no torch module involved)."""
    state = {k: v.double().numpy() for k, v in torch.load(head_file, map_location="cpu", weights_only=True).items()}
    w, b = np.eye(768), np.zeros(768)
    for layer in (0, 2, 4, 6, 7):
        weight, bias = state[f"layers.{layer}.weight"], state[f"layers.{layer}.bias"]
        w, b = w @ weight.T, b @ weight.T + bias
    return w[:, 0], float(b[0])


@needs_head
def test_the_real_head_loads_on_cpu_and_is_one_affine_map() -> None:
    head = load_head(HEAD)
    assert {p.device.type for p in head.parameters()} == {"cpu"}
    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(5, 768))
    embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
    w, b = affine_form(HEAD)
    with torch.inference_mode():
        scores = head(torch.as_tensor(embeds, dtype=torch.float32)).squeeze(-1).double().numpy()
    np.testing.assert_allclose(scores, embeds @ w + b, rtol=1e-5, atol=1e-5)


@needs_head
def test_head_checksum_download_and_cache(tmp_path: Path) -> None:
    assert fetch_head(str(HEAD), "unused", HEAD_SHA256, tmp_path) == HEAD
    with pytest.raises(ValueError, match=r"has sha256 21dd590f.*, expected 0000.*wrong or corrupted file"):
        fetch_head(str(HEAD), "unused", "0" * 64, tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        fetch_head(str(tmp_path / "missing.pth"), "unused", HEAD_SHA256, tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="wrong or corrupted file"):
        fetch_head(None, HEAD.as_uri(), "0" * 64, cache)
    assert not list(cache.iterdir())  # a download with the wrong digest never lands in the cache
    cached = fetch_head(None, HEAD.as_uri(), HEAD_SHA256, cache)
    assert cached.read_bytes() == HEAD.read_bytes()
    assert fetch_head(None, (tmp_path / "gone.pth").as_uri(), HEAD_SHA256, cache) == cached  # served from the cache
    with pytest.raises(ValueError, match="could not download the aesthetic head"):
        fetch_head(None, (tmp_path / "gone.pth").as_uri(), HEAD_SHA256, tmp_path / "empty-cache")


@needs_head
def test_aesthetic_through_the_real_server(tiny_clip: Path, photo_batch: npt.NDArray[np.uint8]) -> None:
    reward = build_reward("aesthetic", options={"clip_model": str(tiny_clip), "head_path": str(HEAD)})
    assert isinstance(reward, Aesthetic)
    reward.load()
    w, b = affine_form(HEAD)
    embeds = reward.embed(photo_batch).double().numpy()
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, rtol=1e-6)  # L2-normalised, as the head expects
    expected = embeds @ w + b  # the head applied independently
    with ServerThread([reward]) as server, RewardClient(server.address) as client:
        (info,) = client.list_rewards()
        assert (info.name, info.requires_prompt, info.higher_is_better) == ("aesthetic", False, True)
        batch = client.score("aesthetic", list(photo_batch))
    assert all(item.ok for item in batch.items)
    np.testing.assert_allclose([item.score for item in batch.items], expected, rtol=1e-5)
    assert np.ptp(expected) > 0  # different photographs, different scores


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match=r"takes options .*clip_model.*; got unknown option"):
        build_reward("aesthetic", options={"model": "x"})
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        Aesthetic("aesthetic", dtype="float16")
    with pytest.raises(ValueError, match="dtype must be one of float32, float16, bfloat16, got 'float64'"):
        Aesthetic("aesthetic", dtype="float64")
    with pytest.raises(RuntimeError, match="not loaded"):
        Aesthetic("aesthetic").embed([np.zeros((8, 8, 3), np.uint8)])


@needs_head
def test_ddpo_serve_builds_the_aesthetic_reward_from_its_config_file(
    tiny_clip: Path, tmp_path: Path, photo_batch: npt.NDArray[np.uint8]
) -> None:
    config = tmp_path / "server.toml"
    config.write_text(
        f'[rewards.aesthetic]\nmax_batch_size = 4\n\n[rewards.aesthetic.options]\nclip_model = "{tiny_clip}"\n'
        f'head_path = "{HEAD}"\ndevice = "cpu"\n'
    )
    reward = Aesthetic("aesthetic", clip_model=str(tiny_clip), head_path=str(HEAD))
    reward.load()
    expected = reward.score(list(photo_batch), [None] * len(photo_batch), [{}] * len(photo_batch)).scores
    with ServerProcess("--config", str(config)) as server, RewardClient(server.address) as client:
        batch = client.score("aesthetic", list(photo_batch))
    np.testing.assert_allclose([item.score for item in batch.items], expected, rtol=1e-5)


def test_clip_pixels_match_the_clip_image_processor(photos: dict[str, npt.NDArray[np.uint8]]) -> None:
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor()  # OpenAI CLIP's settings
    images = [*photos.values(), next(iter(photos.values()))[:97, :131]]  # landscape, portrait, square, small
    reference = processor(images=images, return_tensors="pt")["pixel_values"]
    ours = clip_pixels(images, processor, "cpu")
    assert ours.shape == reference.shape == (len(images), 3, 224, 224)
    difference = (ours - reference).abs()
    assert float(difference.mean()) < 0.01  # under one uint8 level (0.015 after normalisation)
    assert float(difference.amax(dim=(1, 2, 3)).max()) < 0.15  # bicubic kernels differ a little at sharp edges
