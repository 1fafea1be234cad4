"""Rewards found by name. ``build_reward(type, name, options)`` is the one way every front end constructs a reward."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from reward_server.rewards.aesthetic import Aesthetic
from reward_server.rewards.base import ImageSpec, ItemError, Metadata, Reward, RewardOutput, RewardSpec
from reward_server.rewards.jpeg import JpegSize
from reward_server.rewards.llava import LlavaBertScore, LlavaVqa

__all__ = [
    "REWARD_TYPES",
    "ImageSpec",
    "ItemError",
    "Metadata",
    "Reward",
    "RewardOutput",
    "RewardSpec",
    "build_reward",
]

# type name -> factory(name, **options). The served name defaults to the type name.
REWARD_TYPES: dict[str, Callable[..., Reward]] = {
    "jpeg_compressibility": lambda name: JpegSize(name, sign=-1),
    "jpeg_incompressibility": lambda name: JpegSize(name, sign=+1),
    # model rewards: torch and transformers (the rewards extra); weights load in ``Reward.load``
    "aesthetic": Aesthetic,
    "llava_bertscore": LlavaBertScore,
    "llava_vqa": LlavaVqa,
}


def build_reward(reward_type: str, name: str | None = None, options: Mapping[str, Any] | None = None) -> Reward:
    """Construct the reward ``reward_type`` served as ``name``, checking ``options`` against its factory."""
    if reward_type not in REWARD_TYPES:
        raise ValueError(f"unknown reward type {reward_type!r}; known types: {', '.join(sorted(REWARD_TYPES))}")
    factory = REWARD_TYPES[reward_type]
    options = dict(options or {})
    accepted = [p for p in inspect.signature(factory).parameters if p != "name"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"takes options {', '.join(accepted)}" if accepted else "takes no options"
        raise ValueError(f"reward type {reward_type!r} {takes}; got unknown option(s) {', '.join(unknown)}")
    return factory(name or reward_type, **options)
