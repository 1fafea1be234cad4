"""The DDPO losses, in one place (Black et al., 2023, §4; the replication write-up's Algorithms 1-5).

Denoising is an MDP: the state is (c, t, x_t), the action is x_{t−1}, the policy is the Gaussian DDIM step
π_θ(x_{t−1} | x_t, c) = N(μ_θ(x_t, t, c), σ_t² I), and the only reward r(x_0, c) comes at the end. Every loss below is
for one denoising step of a minibatch of trajectories; the trainer averages it over the steps it trains on (a random
``timestep_fraction`` of them, per sample). Each takes a batch of (sample, step) pairs whose steps may differ: its
mean over k steps' worth of pairs is the mean of the k per-step losses, which is how the trainer batches timesteps
into one UNet call. All are minimised.

Notation: A is the advantage (the reward normalised per prompt, then clipped), log π is averaged over the latent's
dimensions (see ``trainer.ddim``), and old means "at sampling time", i.e. under θ_old.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class LossTerms:
    loss: torch.Tensor  # the scalar to back-propagate
    approx_kl: torch.Tensor  # ½ E[(log π_θ − log π_old)²]: how far θ moved from θ_old (no gradient)
    clipfrac: torch.Tensor  # fraction of samples whose ratio left [1 − ε, 1 + ε] (no gradient)


def _diagnostics(log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        log_ratio = log_prob - old_log_prob
        approx_kl = 0.5 * (log_ratio**2).mean()
        clipfrac = ((log_ratio.exp() - 1).abs() > clip_range).float().mean()
    return approx_kl, clipfrac


def ddpo_sf_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor) -> LossTerms:
    """DDPO-SF, the score-function (REINFORCE) estimator, the paper's equation (1):

        ∇_θ J = E[ Σ_t ∇_θ log π_θ(x_{t−1} | x_t, c) · A ]   ⇒   L = −E[ A · log π_θ(x_{t−1} | x_t, c) ]

    It is unbiased only on-policy (θ = θ_old): the first optimizer step of an epoch. Further steps on the same samples
    (inner epochs, several steps per epoch) are what DDPO-IS corrects for.
    """
    loss = -(advantages * log_prob).mean()
    approx_kl, clipfrac = _diagnostics(log_prob, old_log_prob, clip_range=0.0)
    return LossTerms(loss=loss, approx_kl=approx_kl, clipfrac=clipfrac)


def ddpo_is_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> LossTerms:
    """DDPO-IS, the importance-sampled estimator with PPO's clipped trust region, the paper's equation (2):

        ρ = π_θ(x_{t−1} | x_t, c) / π_old(x_{t−1} | x_t, c) = exp(log π_θ − log π_old)
        L = E[ max(−A · ρ, −A · clip(ρ, 1 − ε, 1 + ε)) ]

    At θ = θ_old, ρ = 1 and the gradient equals DDPO-SF's. The max of the two negated terms is PPO's pessimistic bound:
    once ρ leaves the trust region in the direction the advantage favours, the gradient is zero.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    approx_kl, clipfrac = _diagnostics(log_prob, old_log_prob, clip_range)
    return LossTerms(loss=loss, approx_kl=approx_kl, clipfrac=clipfrac)


def exact_kl_penalty(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """DDPO-IS-KL's default penalty: the exact KL between the two Gaussian steps, which share σ_t:

        KL(π_θ(· | x_t, c) ‖ π_ref(· | x_t, c)) = ‖μ_θ − μ_ref‖² / (2 σ_t²)

    averaged over the latent's dimensions like the log-probability, then over the batch. π_ref is the pretrained
    model (with LoRA: the same UNet with the adapter disabled). Returns the mean KL; the caller weights it.
    """
    kl = (mean - ref_mean) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim))).mean()


def logprob_sq_kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """The replication write-up's penalty (Algorithm 5), per step: ½ (log π_θ(x_{t−1} | x_t, c) − log π_ref(…))².

    A sample-based estimate that is zero where the two policies agree on the sampled action; multiply by λ_KL.
    """
    return 0.5 * ((log_prob - ref_log_prob) ** 2).mean()


def rwr_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Reward-weighted regression (RWR and sparse RWR) on the diffusion model's own denoising loss:

        L = E_{x_0 ~ D, t, ε}[ w(x_0, c) · ‖ε − ε_θ(sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε, t, c)‖² ]

    with w = exp(β r)/Z per prompt (RWR) or 1{r ≥ C} (sparse RWR); see ``trainer.advantages``. The target is ε for
    epsilon-prediction models and the velocity for v-prediction ones. The squared error is averaged over dimensions.
    """
    per_sample = ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))
    return (weights * per_sample).mean()
