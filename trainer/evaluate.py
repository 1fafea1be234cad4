"""Held-out evaluation during training: fixed prompts, fixed noise, scored by the same reward service.

Every evaluation of a run (``Trainer.run_eval``) draws its noise from a fresh generator with ``eval.seed`` and
samples the prompts in the same batches, so the image of one prompt and seed before training and after it differ
only by what training changed. The evaluation has its own generator and never touches the training generators: a
run trains the same with evaluation on or off.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclasses.dataclass
class EvalResult:
    epoch: int  # 0: before training
    prompts: list[str]
    images: npt.NDArray[np.uint8]  # (N, H, W, 3)
    rewards: npt.NDArray[np.float64]  # (N,) NaN where an item failed and was dropped

    def summary(self) -> dict[str, Any]:
        """What eval.jsonl records: the mean and std over scored items, and each prompt's mean."""
        kept = ~np.isnan(self.rewards)
        per_prompt: dict[str, list[float]] = {}
        for prompt, reward in zip(self.prompts, self.rewards, strict=True):
            if not np.isnan(reward):
                per_prompt.setdefault(prompt, []).append(float(reward))
        return {
            "epoch": self.epoch,
            "reward_mean": float(self.rewards[kept].mean()),
            "reward_std": float(self.rewards[kept].std()),
            "samples": int(kept.sum()),
            "dropped": int((~kept).sum()),
            "per_prompt": {prompt: float(np.mean(values)) for prompt, values in per_prompt.items()},
            "rewards": [None if np.isnan(r) else float(r) for r in self.rewards],
        }


def evaluation_prompts(prompts: list[str], samples_per_prompt: int) -> list[str]:
    """Each prompt ``samples_per_prompt`` times in a row, the order every evaluation of a run uses."""
    return [prompt for prompt in prompts for _ in range(samples_per_prompt)]
