"""A reward plugin for bench/replicas.py: it sleeps a fixed time per batch, so that throughput measures fan-out.

ddpo serve --plugin bench.sleep_reward --rewards sleepy        # 0.2 s per batch, whatever its size
SLEEP_REWARD_S=0.5 ddpo serve --plugin bench.sleep_reward --rewards sleepy
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from reward_server.plugins import Metadata, reward

SLEEP_S = float(os.environ.get("SLEEP_REWARD_S", "0.2"))


@reward(name="sleepy", description=f"the mean pixel, after sleeping {SLEEP_S} s per batch", units="level")
def sleepy(
    images: Sequence[npt.NDArray[np.uint8]], prompts: Sequence[str | None], metadata: Sequence[Metadata]
) -> list[float]:
    time.sleep(SLEEP_S)
    return [float(image.mean()) for image in images]
