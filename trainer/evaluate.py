"""Held-out evaluation during training: fixed prompts, fixed noise, scored by the same reward service.

Every evaluation of a run (``Trainer.run_eval``) draws its noise from a fresh generator with ``eval.seed`` and
samples the prompts in the same batches, so the image of one prompt and seed before training and after it differ
only by what training changed. The evaluation has its own generator and never touches the training generators: a
run trains the same with evaluation on or off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from clients import ItemResult
from clients.evaluation import ImageRecord


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

    def records(self, reward: str, samples_per_prompt: int, failures: Sequence[ItemResult]) -> list[ImageRecord]:
        """The lines of results.jsonl (``clients.evaluation``) for the images saved as eval/epoch_N/{i:03d}.png.

        The variant is "epoch_N". Seeds are None: the evaluation's noise comes from one generator (``eval.seed``)
        drawn batch after batch, not from a generator per image. ``failures`` are the items the service failed
        (their id is the item's position), recorded with their "CODE: message".
        """
        failed = {int(result.id): result for result in failures}
        records = []
        for i, (prompt, score) in enumerate(zip(self.prompts, self.rewards, strict=True)):
            record = ImageRecord(
                f"epoch_{self.epoch}", prompt, i // samples_per_prompt, i % samples_per_prompt, None, f"{i:03d}.png"
            )
            if i in failed:
                record.add_result(reward, failed[i])
            elif np.isnan(score):
                record.add_error(reward, "UNKNOWN: no score was recorded for this item")
            else:
                record.rewards[reward] = float(score)
            records.append(record)
        return records


def evaluation_prompts(prompts: list[str], samples_per_prompt: int) -> list[str]:
    """Each prompt ``samples_per_prompt`` times in a row, the order every evaluation of a run uses."""
    return [prompt for prompt in prompts for _ in range(samples_per_prompt)]
