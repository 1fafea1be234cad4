"""JPEG (in)compressibility, as defined by the DDPO paper and kvablack/ddpo-pytorch's ``rewards.py``.

The uint8 RGB image is saved by Pillow as JPEG at quality 95, without resizing; the reward is the file size in kB
(bytes / 1000), negated for compressibility so that higher is always better.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image

from reward_server.rewards.base import ImageSpec, Metadata, Reward, RewardOutput, RewardSpec

JPEG_QUALITY = 95


def jpeg_size_kb(image: npt.NDArray[np.uint8]) -> float:
    """Size in kB of the (H, W, 3) uint8 image saved by Pillow as JPEG at quality 95."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell() / 1000


class JpegSize(Reward):
    """The JPEG file size in kB, multiplied by ``sign`` (-1: compressibility, +1: incompressibility)."""

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
