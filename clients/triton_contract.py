"""How a reward looks as a Triton model: tensor names, per-item answers and the reward's spec.

Shared by the Triton Python-backend model and the PyTriton frontend (which write it) and the ``triton://`` client
(which reads it); it needs only numpy, so each side imports it without the other's dependencies.

Inputs (batched: the first dimension is the item; one request holds images of one size):
    IMAGES    UINT8  [n, H, W, 3]
    PROMPTS   BYTES  [n, 1]   UTF-8; b"" means no prompt                              (optional)
    METADATA  BYTES  [n, 1]   one JSON object per item                                (optional)
Outputs:
    SCORES    FP32   [n, 1]   NaN where the item failed
    INFO      BYTES  [n, 1]   one JSON object per item: {"components": {...}, "info": {...}} when it was scored,
                              {"error": {"code": "INVALID_ARGUMENT", "message": "..."}} when it failed
The model config carries the reward's spec in the parameter ``ddpo_reward_spec``: a ``ddpo.reward.v1.RewardSpec`` in
protobuf's JSON mapping, as ``ListRewards`` would return it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

IMAGES = "IMAGES"
PROMPTS = "PROMPTS"
METADATA = "METADATA"
SCORES = "SCORES"
INFO = "INFO"

SPEC_PARAMETER = "ddpo_reward_spec"
"""Model-config parameter holding the reward's spec (RewardSpec as JSON); models without it are not ddpo rewards."""
REWARD_PARAMETER = "ddpo_reward_config"
"""Model-config parameter holding how to build the reward: {"type", "options", "max_image_size"}."""


def encode_answer(error: tuple[str, str] | None, components: Mapping[str, float], info: Mapping[str, str]) -> bytes:
    """One item's INFO entry; ``error`` is (status code name, message)."""
    if error is not None:
        return json.dumps({"error": {"code": error[0], "message": error[1]}}).encode()
    return json.dumps({"components": dict(components), "info": dict(info)}).encode()


def decode_answer(entry: bytes) -> dict[str, Any]:
    """Parse one INFO entry; ValueError if it is not what ``encode_answer`` writes."""
    answer = json.loads(entry)
    if not isinstance(answer, dict) or not ({"error"} <= answer.keys() or {"components", "info"} <= answer.keys()):
        raise ValueError(f"INFO entry is not a ddpo reward answer: {entry[:200]!r}")
    return answer
