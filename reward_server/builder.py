"""Reward objects from their config entries, as the gRPC server, runtime endpoints and the Triton front ends build
them (the Triton ones without importing the gRPC server)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from reward_server.batching import BatchingConfig
from reward_server.composite import COMPOSITE
from reward_server.config import RewardConfig
from reward_server.rewards import Reward, build_reward


def build_rewards(configs: Sequence[RewardConfig]) -> list[tuple[Reward, BatchingConfig]]:
    """Construct the configured rewards (not yet loaded), applying per-reward image limits. Composites are not
    reward objects: the server's registry builds them from the others."""
    built = []
    for config in configs:
        if config.type == COMPOSITE:
            continue
        reward = build_reward(config.type, config.name, config.options)
        if config.max_image_size is not None:
            spec = reward.spec
            own_h, own_w = spec.image_spec.max_size
            limit = (min(own_h, config.max_image_size[0]), min(own_w, config.max_image_size[1]))
            reward.spec = dataclasses.replace(spec, image_spec=dataclasses.replace(spec.image_spec, max_size=limit))
        built.append((reward, config.batching))
    return built
