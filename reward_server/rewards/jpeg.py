"""JPEG (in)compressibility, as defined by the DDPO paper and kvablack/ddpo-pytorch's ``rewards.py``.

The uint8 RGB image is saved by Pillow as JPEG at quality 95, without resizing; the reward is the file size in kB
(bytes / 1000), negated for compressibility so that higher is always better.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image

from reward_server.rewards.base import ImageSpec, Metadata, Reward, RewardOutput, RewardSpec

JPEG_QUALITY = 95


def jpeg_size_kb(image: npt.NDArray[np.uint8]) -> float:
    """Size in kB of the (H, W, 3) uint8 image saved by Pillow as JPEG at quality 95.

    Pillow writes to a real file descriptor with the GIL released, but encodes into a BytesIO while holding it, so
    an in-memory file (memfd, Linux) lets several scoring threads use several cores. The bytes are the same.
    """
    pil_image = Image.fromarray(image)
    if not hasattr(os, "memfd_create"):
        buffer = io.BytesIO()
        pil_image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.tell() / 1000
    with os.fdopen(os.memfd_create("jpeg", os.MFD_CLOEXEC), "wb") as file:
        pil_image.save(file, format="JPEG", quality=JPEG_QUALITY)
        return file.tell() / 1000


class JpegSize(Reward):
    """The JPEG file size in kB, multiplied by ``sign`` (-1: compressibility, +1: incompressibility)."""

    preferred_instances = os.cpu_count() or 1  # the encoder runs without the GIL (see jpeg_size_kb)
    preferred_max_batch_size = 8  # each image is encoded on its own: small batches spread a request over instances

    def __init__(self, name: str, sign: int) -> None:
        if sign not in (-1, 1):
            raise ValueError(f"sign must be -1 (compressibility) or +1 (incompressibility), got {sign}")
        self.sign = sign
        goal = "smaller" if sign < 0 else "larger"
        self.spec = RewardSpec(
            name=name,
            description=f"{'Negative' if sign < 0 else 'Positive'} JPEG size (Pillow, quality 95) in kB: "
            f"{goal} files score higher",
            version="1",
            units="kB",
            image_spec=ImageSpec(channels=(3,), max_size=(4096, 4096)),
        )

    def score(
        self,
        images: Sequence[npt.NDArray[np.uint8]],
        prompts: Sequence[str | None],
        metadata: Sequence[Metadata],
    ) -> RewardOutput:
        sizes = np.array([jpeg_size_kb(image) for image in images], dtype=np.float64)
        return RewardOutput(scores=self.sign * sizes)
