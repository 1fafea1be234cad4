"""The training algorithms as a table: what each needs, how it weights samples, and what it minimises.

    algorithm    importance ratio   reference model   weights                         loss
    ddpo_is      yes                no                clipped normalised advantages   clipped surrogate
    ddpo_sf      yes                no                clipped normalised advantages   −A · log π
    ddpo_is_kl   yes                yes               clipped normalised advantages   clipped surrogate + β KL
    rwr          no                 no                exp(β r) / Z                    weighted denoising loss
    sparse_rwr   no                 no                1 above a threshold, else 0     weighted denoising loss

An algorithm with an importance ratio recomputes log π_θ of the recorded steps and reports approx_kl, clipfrac and
max |ratio − 1| (the ratio self-check); RWR regresses the noise of fresh draws instead. The maths of every loss is
in ``trainer.losses``; a loss here computes one training call's terms: for samples ``indices`` (B) at their recorded
steps ``steps`` (B, k), the mean of the k per-step losses, all B·k (sample, step) pairs in one UNet call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import torch

from trainer import advantages as adv
from trainer import losses
from trainer.config import TrainConfig
from trainer.ddim import DDIMStepOutput
from trainer.policy import Epoch, Policy
from trainer.sampling import guided_noise_pred

FloatArray = npt.NDArray[np.float64]
Terms = dict[str, torch.Tensor]
# (prompts, rewards, train config, per-prompt statistics or None for batch statistics) -> the loss's sample weights
WeightsFn = Callable[[Sequence[str], FloatArray, TrainConfig, "adv.PerPromptStatTracker | None"], FloatArray]
# (policy, epoch, indices (B,), steps (B, k), train config, generator of RWR's draws) -> the call's loss terms
LossFn = Callable[[Policy, Epoch, torch.Tensor, torch.Tensor, TrainConfig, torch.Generator], Terms]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    ratio: bool  # trains on recorded log-probabilities: approx_kl, clipfrac and the ratio self-check exist
    reference: bool  # needs the frozen pretrained model
    weights: WeightsFn
    loss: LossFn


# ------------------------------------------------------------------ sample weights


def advantages(
    prompts: Sequence[str], rewards: FloatArray, t: TrainConfig, tracker: adv.PerPromptStatTracker | None
) -> FloatArray:
    """DDPO's advantages: rewards normalised per prompt (or over the batch without a tracker), then clipped."""
    normalised = adv.batch_normalize(rewards) if tracker is None else tracker.normalize(list(prompts), rewards)
    return adv.clip_advantages(normalised, t.adv_clip_max)


def rwr_weights(
    prompts: Sequence[str], rewards: FloatArray, t: TrainConfig, tracker: adv.PerPromptStatTracker | None
) -> FloatArray:
    return adv.rwr_weights(prompts, rewards, t.rwr_beta)


def sparse_rwr_weights(
    prompts: Sequence[str], rewards: FloatArray, t: TrainConfig, tracker: adv.PerPromptStatTracker | None
) -> FloatArray:
    return adv.sparse_rwr_weights(rewards, t.sparse_threshold, t.sparse_percentile)


# ------------------------------------------------------------------ losses


@dataclasses.dataclass
class RecordedPairs:
    """B samples × k recorded steps, laid out step by step (each step a block of B), so that every mean over the
    pairs is the mean over steps of the per-step mean; with π_θ of each pair from one UNet call."""

    samples: torch.Tensor  # (k·B,)
    step_index: torch.Tensor  # (k·B,)
    step: DDIMStepOutput  # π_θ(x_{t−1} | x_t, c) with the log-probability of the recorded x_{t−1}
    old_log_prob: torch.Tensor  # (k·B,) log π_old, recorded while sampling
    advantages: torch.Tensor  # (k·B,)

    @classmethod
    def of(cls, policy: Policy, data: Epoch, indices: torch.Tensor, steps: torch.Tensor) -> RecordedPairs:
        samples = indices.repeat(steps.shape[1])
        step_index = steps.T.reshape(-1)
        step = policy.step(data, samples, step_index)
        return cls(samples, step_index, step, data.log_probs[samples, step_index], data.weights[samples])

    def clipped_surrogate(self, clip_range: float) -> Terms:
        """DDPO-IS's terms over these pairs (``losses.ddpo_is_loss``)."""
        return self.terms(losses.ddpo_is_loss(self.step.log_prob, self.old_log_prob, self.advantages, clip_range))

    def terms(self, objective: losses.LossTerms) -> Terms:
        """The objective's terms, with max |π_θ/π_old − 1| (inf for NaN) for the ratio self-check."""
        with torch.no_grad():
            ratio = torch.exp(self.step.log_prob - self.old_log_prob)
            deviation = (ratio - 1).abs().nan_to_num(torch.inf).max()
        return {
            "loss": objective.loss,
            "approx_kl": objective.approx_kl,
            "clipfrac": objective.clipfrac,
            "ratio_deviation": deviation,
        }


def importance_sampling_loss(
    policy: Policy, data: Epoch, indices: torch.Tensor, steps: torch.Tensor, t: TrainConfig, _: torch.Generator
) -> Terms:
    return RecordedPairs.of(policy, data, indices, steps).clipped_surrogate(t.clip_range)


def score_function_loss(
    policy: Policy, data: Epoch, indices: torch.Tensor, steps: torch.Tensor, t: TrainConfig, _: torch.Generator
) -> Terms:
    pairs = RecordedPairs.of(policy, data, indices, steps)
    return pairs.terms(losses.ddpo_sf_loss(pairs.step.log_prob, pairs.old_log_prob, pairs.advantages))


def kl_regularised_loss(
    policy: Policy, data: Epoch, indices: torch.Tensor, steps: torch.Tensor, t: TrainConfig, _: torch.Generator
) -> Terms:
    """DDPO-IS plus kl_coef · KL(π_θ ‖ π_ref) per step, π_ref the pretrained model (no gradient through it)."""
    pairs = RecordedPairs.of(policy, data, indices, steps)
    step = pairs.step
    out = pairs.clipped_surrogate(t.clip_range)
    with torch.no_grad(), policy.reference() as reference:
        ref = policy.step(data, pairs.samples, pairs.step_index, unet=reference)
    if t.kl_estimator == "exact":
        kl = losses.exact_kl_penalty(step.mean, ref.mean, step.std)
    else:
        kl = losses.logprob_sq_kl_penalty(step.log_prob, ref.log_prob)
    policy_loss = out["loss"]
    return out | {"kl": kl.detach(), "policy_loss": policy_loss.detach(), "loss": policy_loss + t.kl_coef * kl}


def denoising_loss(
    policy: Policy, data: Epoch, indices: torch.Tensor, steps: torch.Tensor, t: TrainConfig, generator: torch.Generator
) -> Terms:
    """RWR's weighted denoising loss at k = steps.shape[1] fresh random training timesteps and noises for each
    sample, in one UNet call: the mean of k per-draw losses, drawn in the order of one call per draw.

    With train.cfg (the default, as the replication's Algorithms 1-2 and jannerm/ddpo) the regressed prediction is
    the guided one, ε_u + w (ε_c − ε_u): the call takes twice the batch, so twice the activation memory.
    """
    x0, weights, draws = data.latents[indices, -1], data.weights[indices], steps.shape[1]
    scheduler = policy.scheduler
    timesteps, noise = [], []
    for _ in range(draws):
        timesteps.append(torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator))
        noise.append(torch.randn(x0.shape, generator=generator, dtype=x0.dtype))
    t_draws = torch.cat(timesteps).to(x0.device)
    eps = torch.cat(noise).to(x0.device)
    x0 = x0.repeat(draws, *[1] * (x0.ndim - 1))
    noisy = scheduler.add_noise(x0, eps, t_draws)
    embeds = data.prompt_embeds[indices].repeat(draws, 1, 1)
    prediction = guided_noise_pred(policy.unet, noisy, t_draws, embeds, policy.negative_embeds, policy.guidance_scale)
    target = scheduler.get_velocity(x0, eps, t_draws) if scheduler.config.prediction_type == "v_prediction" else eps
    return {"loss": losses.rwr_loss(prediction, target, weights.repeat(draws))}


ALGORITHMS: dict[str, Algorithm] = {
    "ddpo_is": Algorithm(ratio=True, reference=False, weights=advantages, loss=importance_sampling_loss),
    "ddpo_sf": Algorithm(ratio=True, reference=False, weights=advantages, loss=score_function_loss),
    "ddpo_is_kl": Algorithm(ratio=True, reference=True, weights=advantages, loss=kl_regularised_loss),
    "rwr": Algorithm(ratio=False, reference=False, weights=rwr_weights, loss=denoising_loss),
    "sparse_rwr": Algorithm(ratio=False, reference=False, weights=sparse_rwr_weights, loss=denoising_loss),
}
