"""Two custom rewards, written against the public plugin API (``reward_server.plugins``).

- ``brightness``: a function of the batch. Its keyword-only parameter ``gamma`` is an option
  (``[rewards.brightness] options = {gamma = 2.2}``).
- ``colour_match``: a ``Reward`` subclass that needs the prompt. It scores how close the image's mean colour is to the
  colour the prompt names, and fails an item alone when the prompt names no colour it knows.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np
import numpy.typing as npt

from reward_server.plugins import (
    ImageSpec,
    ItemError,
    Metadata,
    Reward,
    RewardOutput,
    RewardSpec,
    register_reward_type,
    reward,
)

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601


@reward(
    name="brightness",
    description="Mean luma (BT.601) of the image after a gamma curve, 0-255",
    units="level",
    max_batch_size=16,
)
def brightness(
    images: Sequence[npt.NDArray[np.uint8]],
    prompts: Sequence[str | None],
    metadata: Sequence[Metadata],
    *,
    gamma: float = 1.0,
) -> list[float]:
    return [float(255 * (((image @ LUMA) / 255.0) ** gamma).mean()) for image in images]


COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}


@register_reward_type("colour_match")
class ColourMatch(Reward):
    """Minus the distance (0-1) between the image's mean colour and the colour named in the prompt."""

    def __init__(self, name: str, colours: dict[str, list[int]] | None = None) -> None:
        self.colours = {word: np.array(rgb, dtype=np.float64) for word, rgb in (colours or COLOURS).items()}
        self.spec = RewardSpec(
            name=name,
            description="How close the mean colour is to the colour named in the prompt (0 is a perfect match)",
            version="1",
            units="-distance",
            requires_prompt=True,
            image_spec=ImageSpec(channels=(3,)),
            component_names=("distance",),
        )

    def score(
        self,
        images: Sequence[npt.NDArray[np.uint8]],
        prompts: Sequence[str | None],
        metadata: Sequence[Metadata],
    ) -> RewardOutput:
        scores = np.full(len(images), np.nan)
        errors: list[ItemError | None] = [None] * len(images)
        info = [{} for _ in images]
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            named = [word for word in (prompt or "").lower().split() if word in self.colours]
            if not named:
                errors[i] = ItemError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"prompt {prompt!r} names no colour; known colours: {', '.join(sorted(self.colours))}",
                )
                continue
            mean = image.reshape(-1, 3).mean(axis=0)
            scores[i] = -float(np.linalg.norm(mean - self.colours[named[0]]) / np.linalg.norm([255, 255, 255]))
            info[i] = {"colour": named[0]}
        return RewardOutput(scores=scores, components={"distance": -scores}, info=info, errors=errors)
