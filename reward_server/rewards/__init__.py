"""Rewards found by name. ``build_reward(type, name, options)`` is the one way every front end constructs a reward.

The built-in types and the registry of types are in ``reward_server.rewards.catalog``; ``reward_server.plugins`` adds
the types of plugins and installed packages to it.
"""

from __future__ import annotations

from reward_server.rewards.base import ImageSpec, ItemError, Metadata, Reward, RewardOutput, RewardSpec
from reward_server.rewards.catalog import BUILTIN_REWARD_TYPES, build_reward

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
