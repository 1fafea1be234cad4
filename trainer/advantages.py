"""From rewards to the per-sample numbers the losses weight by: advantages (DDPO) and weights (RWR).

The per-prompt statistics follow kvablack/ddpo-pytorch's ``stat_tracking.py``: each prompt keeps its last
``buffer_size`` rewards, and until it has ``min_count`` of them its samples are normalised with the whole epoch's
mean and standard deviation instead.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

PER_PROMPT_EPS = 1e-6
"""Added to the per-prompt standard deviation, as ddpo-pytorch's stat_tracking.py."""
BATCH_EPS = 1e-8
"""Added to the whole epoch's standard deviation, as ddpo-pytorch's train.py (without per-prompt tracking)."""

FloatArray = npt.NDArray[np.float64]


class PerPromptStatTracker:
    """Running reward statistics per prompt; ``normalize`` returns (r − μ_prompt) / (σ_prompt + ε)."""

    def __init__(self, buffer_size: int, min_count: int) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size ({buffer_size}) and min_count ({min_count}) must be >= 1")
        if min_count > buffer_size:
            raise ValueError(
                f"min_count ({min_count}) cannot exceed buffer_size ({buffer_size}): it would never be met"
            )
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, collections.deque[float]] = {}

    def normalize(self, prompts: Sequence[str], rewards: FloatArray) -> FloatArray:
        """Add this epoch's rewards to the buffers, then normalise each with its prompt's (or the batch's) stats."""
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts but {len(rewards)} rewards")
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std()
        prompt_array = np.array(prompts, dtype=object)
        for prompt in dict.fromkeys(prompts):
            mask = prompt_array == prompt
            buffer = self.buffers.setdefault(prompt, collections.deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buffer), np.std(buffer)
            advantages[mask] = (rewards[mask] - mean) / (std + PER_PROMPT_EPS)
        return advantages

    def stats(self) -> dict[str, float]:
        counts = [len(buffer) for buffer in self.buffers.values()]
        return {"prompts_tracked": len(counts), "mean_buffer_len": float(np.mean(counts)) if counts else 0.0}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, so that a resumed run starts with warm statistics."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffers = {
            prompt: collections.deque((float(r) for r in rewards), maxlen=self.buffer_size)
            for prompt, rewards in state["buffers"].items()
        }


def batch_normalize(rewards: FloatArray) -> FloatArray:
    """(r − mean) / (std + ε) over the whole epoch: the advantage without per-prompt tracking."""
    rewards = np.asarray(rewards, dtype=np.float64)
    advantages: FloatArray = (rewards - rewards.mean()) / (rewards.std() + BATCH_EPS)
    return advantages


def rwr_weights(prompts: Sequence[str], rewards: FloatArray, beta: float) -> FloatArray:
    """RWR weights exp(βr)/Z, with Z a sum over the samples of the same prompt.

    w_i = n_c · exp(β r_i) / Σ_{j ∈ c} exp(β r_j), where c is sample i's prompt and n_c its sample count: the weights
    of each prompt average 1, so the weighted loss keeps the scale of the plain denoising loss and every prompt counts
    as often as it was drawn. Computed as a softmax, so that a large β r does not overflow.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    weights = np.empty_like(rewards)
    prompt_array = np.array(prompts, dtype=object)
    for prompt in dict.fromkeys(prompts):
        mask = prompt_array == prompt
        logits = beta * rewards[mask]
        softmax = np.exp(logits - logits.max())
        weights[mask] = mask.sum() * softmax / softmax.sum()
    return weights


def sparse_rwr_weights(rewards: FloatArray, threshold: float | None, percentile: float | None) -> FloatArray:
    """Binary weights 1{r ≥ C}, with C a fixed ``threshold`` or the epoch's ``percentile`` of rewards.

    The kept samples are scaled by N / (number kept), so the weights average 1 like RWR's. Nothing kept means a zero
    loss for the epoch, which the caller logs.
    """
    if (threshold is None) == (percentile is None):
        raise ValueError("sparse RWR needs exactly one of threshold and percentile")
    rewards = np.asarray(rewards, dtype=np.float64)
    if percentile is not None:
        cutoff = float(np.percentile(rewards, percentile))
    elif threshold is not None:
        cutoff = threshold
    keep = (rewards >= cutoff).astype(np.float64)
    kept = keep.sum()
    return keep * (len(rewards) / kept) if kept else keep


def clip_advantages(advantages: FloatArray, limit: float) -> FloatArray:
    return np.clip(advantages, -limit, limit)
