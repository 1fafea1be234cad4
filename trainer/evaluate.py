"""Held-out evaluation during training: fixed prompts, fixed noise, scored by the same reward service.

Every evaluation of a run draws its noise from a fresh generator with ``eval.seed`` and samples the prompts in the
same batches, so the image of one prompt and seed before training and after it differ only by what training
changed. The evaluation has its own generator and never touches the training generators: a run trains the same
with evaluation on or off.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from clients import RewardClient
from trainer.config import Config
from trainer.rewards import EpochRewards, RewardError
from trainer.sampling import sample_batch


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


def evaluate(
    pipeline: StableDiffusionPipeline,
    unet: UNet2DConditionModel,
    prompts: list[str],
    negative_embeds: torch.Tensor,
    client: RewardClient,
    config: Config,
    epoch: int,
    device: torch.device,
) -> EvalResult:
    """Sample ``prompts`` with the training sampler's settings and eval.seed's noise; score them with the reward."""
    generator = torch.Generator().manual_seed(config.eval.seed)
    rewards = EpochRewards(client, config.reward.name, config.reward.timeout, config.reward.on_error)
    images = []
    try:
        for start in range(0, len(prompts), config.sample.batch_size):
            batch = sample_batch(
                pipeline,
                unet,
                prompts[start : start + config.sample.batch_size],
                negative_embeds,
                config.sample.num_steps,
                config.sample.guidance_scale,
                config.sample.eta,
                generator,
                device,
            )
            rewards.submit(batch.images, batch.prompts)
            images.append(batch.images)
    except BaseException:
        rewards.cancel()
        raise
    scores = rewards.collect()
    if not scores.kept.any():
        raise RewardError(f"held-out evaluation at epoch {epoch}: reward {config.reward.name!r} failed for every item")
    return EvalResult(epoch=epoch, prompts=prompts, images=np.concatenate(images), rewards=scores.scores)
