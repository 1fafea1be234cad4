from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from tests.support import ServerProcess


def _square(image: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.uint8]:
    side = min(image.shape[:2])
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    crop = Image.fromarray(image[top : top + side, left : left + side])
    return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))


@pytest.fixture(scope="session")
def photos() -> dict[str, npt.NDArray[np.uint8]]:
    """Real RGB photographs shipped by scikit-image and scikit-learn, at their own sizes."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    found = {name: getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}
    for name, image in zip(("china", "flower"), load_sample_images().images, strict=True):
        found[name] = image
    assert all(image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 for image in found.values())
    return found


@pytest.fixture(scope="session")
def photo_batch(photos: dict[str, npt.NDArray[np.uint8]]) -> npt.NDArray[np.uint8]:
    """The photographs as one (6, 128, 128, 3) batch."""
    return np.stack([_square(image, 128) for image in photos.values()])


@pytest.fixture(scope="module")
def jpeg_server() -> Iterator[ServerProcess]:
    """`python -m reward_server` with the JPEG rewards, as a separate process on a free loopback port."""
    with ServerProcess("--rewards", "jpeg_compressibility,jpeg_incompressibility", "--metrics-port", "0") as server:
        yield server


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIP vision tower with random weights and ViT-L/14's 768-d projection, saved like a hub checkpoint."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)  # OpenAI's preprocessing: 224 bicubic, centre crop, CLIP mean/std
    return folder


@pytest.fixture(scope="session")
def undisturbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tests.support.RUN`` (two epochs of the tiny model) against a server that never fails: what every disturbed
    run of the fault and replica tests must end with, bit for bit (JPEG rewards are deterministic)."""
    from tests.support import RUN, train_tiny

    run_dir = tmp_path_factory.mktemp("undisturbed")
    with ServerProcess("--rewards", "jpeg_compressibility") as server:
        done = train_tiny(server.address, run_dir, *RUN)
    assert done.returncode == 0, done.stderr
    return run_dir
