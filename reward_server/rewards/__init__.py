"""Rewards found by name. ``build_reward(type, name, options)`` is the one way every front end constructs a reward.

The built-in types are here; ``reward_server.plugins`` adds the types of plugins and installed packages.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from reward_server.rewards.aesthetic import Aesthetic
from reward_server.rewards.base import ImageSpec, ItemError, Metadata, Reward, RewardOutput, RewardSpec
from reward_server.rewards.jpeg import JpegSize
from reward_server.rewards.llava import LlavaBertScore, LlavaVqa
from reward_server.rewards.remote import REMOTE, RemoteReward

__all__ = [
    "BUILTIN_REWARD_TYPES",
    "ImageSpec",
    "ItemError",
    "Metadata",
    "Reward",
    "RewardOutput",
    "RewardSpec",
    "build_reward",
]

# type name -> factory(name, **options). The served name defaults to the type name.
BUILTIN_REWARD_TYPES: dict[str, Callable[..., Reward]] = {
    "jpeg_compressibility": lambda name: JpegSize(name, sign=-1),
    "jpeg_incompressibility": lambda name: JpegSize(name, sign=+1),
    # model rewards: torch and transformers (the rewards extra); weights load in ``Reward.load``
    "aesthetic": Aesthetic,
    "llava_bertscore": LlavaBertScore,
    "llava_vqa": LlavaVqa,
    # a reward served by another endpoint (grpc://, triton://, http://), forwarded as is
    REMOTE: RemoteReward,
}


def build_reward(reward_type: str, name: str | None = None, options: Mapping[str, Any] | None = None) -> Reward:
    """Construct the reward ``reward_type`` served as ``name``, checking ``options`` against its factory, and the
    result against the reward contract (a plugin's factory may break it)."""
    from reward_server.plugins import PluginError, reward_factory  # plugins import this package: import when used

    factory = reward_factory(reward_type)
    name = name or reward_type
    options = dict(options or {})
    accepted = [p for p in inspect.signature(factory).parameters if p != "name"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"takes options {', '.join(accepted)}" if accepted else "takes no options"
        raise ValueError(f"reward type {reward_type!r} {takes}; got unknown option(s) {', '.join(unknown)}")
    reward = factory(name, **options)
    if not isinstance(reward, Reward) or not isinstance(getattr(reward, "spec", None), RewardSpec):
        raise PluginError(
            f"reward type {reward_type!r} built {type(reward).__name__}, which is not a Reward with a RewardSpec `spec`"
        )
    if reward.spec.name != name:
        raise PluginError(
            f"reward type {reward_type!r} built a reward whose spec is named {reward.spec.name!r} instead of the "
            f"served name {name!r}; set RewardSpec(name=name, ...) from the constructor's `name` argument"
        )
    return reward
