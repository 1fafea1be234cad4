"""One DDIM step that also returns the log-probability of the step it took.

Adapted from diffusers' ``DDIMScheduler.step`` (diffusers 0.42.1, ``schedulers/scheduling_ddim.py``), as
kvablack/ddpo-pytorch's ``ddim_with_logprob.py`` does. Changes:

- ``timestep`` may be one value per sample (the trainer visits timesteps in a different order for each sample);
- stage 8 adds the Gaussian log-density of ``prev_sample``, averaged over every non-batch dimension (the paper's
  choice: a sum over 16k latent dimensions turns float noise into ratios far outside a 1e-4 clip range);
- given ``prev_sample``, the step recomputes the log-probability of that sample instead of drawing a new one;
- a standard deviation of exactly zero at a trained step is an error, not a NaN: it comes from
  ``set_alpha_to_one=True`` (or no ``steps_offset``) on the last step, and one optimizer step on a NaN ruins the model;
- thresholding and ``use_clipped_model_output`` are left out;
- the schedule's arithmetic (ᾱ, σ, the mean's coefficients) is done in float64 and the step itself in at least
  float32, whatever the dtype of the latents; only ``prev_sample`` is cast back. In fp16, ᾱ_{t−1} = 0.998296 rounds to
  0.998535, so 1 − ᾱ_{t−1} − σ² computed in the latents' dtype is negative near t = 0 and the step turns into NaN.

``tests/test_ddim.py`` checks ``prev_sample`` against the installed ``DDIMScheduler.step`` for the same noise, so
drift in diffusers shows up.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

STD_FLOOR = 1e-6
"""Smallest standard deviation used in the log-density, so that a nearly deterministic step stays finite."""


@dataclasses.dataclass(frozen=True)
class DDIMStepOutput:
    prev_sample: torch.Tensor  # (B, C, h, w) x_{t-1}
    log_prob: torch.Tensor  # (B,) log p(x_{t-1} | x_t), averaged over C*h*w
    mean: torch.Tensor  # (B, C, h, w) the Gaussian's mean μ_t, in float32 (or float64)
    std: torch.Tensor  # (B, 1, 1, 1) its standard deviation σ_t (after the floor), in float32 (or float64)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (B,) tensor over the non-batch dimensions of ``like``, in ``like``'s dtype."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def alpha_cumprods(scheduler: DDIMScheduler, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ᾱ_t and ᾱ_{t−1} in float64 on the CPU, where t − 1 is the previous step of the inference schedule (before the
    first training timestep: the scheduler's final_alpha_cumprod)."""
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    timestep = torch.as_tensor(timestep).cpu()
    prev = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas_cumprod = scheduler.alphas_cumprod.cpu().double()
    final = torch.as_tensor(scheduler.final_alpha_cumprod).cpu().double()
    alpha_prod_t_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final)
    return alphas_cumprod[timestep], alpha_prod_t_prev


def step_std(scheduler: DDIMScheduler, timestep: torch.Tensor, eta: float) -> torch.Tensor:
    """σ_t(η) of DDIM's formula (16) for each timestep, in float64:

    η · sqrt((1 − ᾱ_{t−1})/(1 − ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_{t−1})
    """
    alpha_prod_t, alpha_prod_t_prev = alpha_cumprods(scheduler, timestep)
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std: torch.Tensor = eta * variance.sqrt()
    return std


def check_trainable_schedule(scheduler: DDIMScheduler, eta: float) -> None:
    """Raise ValueError if some step of the current schedule has zero variance, so its log-probability is undefined."""
    if eta <= 0:
        raise ValueError(
            f"eta must be > 0 to train (eta={eta} makes every step deterministic, with no log-probability)"
        )
    _check_variance(scheduler, scheduler.timesteps, step_std(scheduler, scheduler.timesteps, eta))


def _check_variance(scheduler: DDIMScheduler, timesteps: torch.Tensor, stds: torch.Tensor) -> None:
    zero = sorted(set(timesteps.flatten()[~(stds.flatten() > 0)].tolist()))
    if zero:
        raise ValueError(
            f"the scheduler gives zero variance at timestep(s) {zero}, so their log-probability is undefined. "
            "Use Stable Diffusion's scheduler settings: set_alpha_to_one=False and steps_offset=1 "
            f"(this scheduler has set_alpha_to_one={scheduler.config.set_alpha_to_one}, "
            f"steps_offset={scheduler.config.steps_offset})"
        )


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    std_floor: float = STD_FLOOR,
) -> DDIMStepOutput:
    """x_t → x_{t−1} for a batch, with log p(x_{t−1} | x_t). ``timestep``: one int, or one per sample (B,).

    The step is computed in float32 (float64 if the inputs are), whatever the dtype of ``sample`` and
    ``model_output``; ``prev_sample`` comes back in ``sample``'s dtype, and ``log_prob`` is the density of that
    returned (rounded) value, so that recomputing it from the stored latents gives the same number.
    """
    timestep = torch.as_tensor(timestep, device="cpu").long()
    if timestep.ndim == 0:
        timestep = timestep.expand(sample.shape[0])
    if timestep.shape != (sample.shape[0],):
        raise ValueError(f"timestep must be a scalar or have shape ({sample.shape[0]},), got {tuple(timestep.shape)}")
    compute = torch.promote_types(sample.dtype, torch.float32)
    x_t, model_output = sample.to(compute), model_output.to(compute)

    # 1-2. previous step value (t − 1 on the inference schedule); ᾱ_t, ᾱ_{t−1}, β̄_t = 1 − ᾱ_t, in float64
    alpha_prod_t, alpha_prod_t_prev = alpha_cumprods(scheduler, timestep)
    beta_prod_t = 1 - alpha_prod_t

    # 3. predicted x_0 and ε, DDIM formula (12)
    prediction_type = scheduler.config.prediction_type
    sqrt_alpha, sqrt_beta = _per_sample(alpha_prod_t.sqrt(), x_t), _per_sample(beta_prod_t.sqrt(), x_t)
    if prediction_type == "epsilon":
        pred_original_sample = (x_t - sqrt_beta * model_output) / sqrt_alpha
        pred_epsilon = model_output
    elif prediction_type == "v_prediction":
        pred_original_sample = sqrt_alpha * x_t - sqrt_beta * model_output
        pred_epsilon = sqrt_alpha * model_output + sqrt_beta * x_t
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (x_t - sqrt_alpha * pred_original_sample) / sqrt_beta
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}: use epsilon, v_prediction or sample")

    # 4. clip predicted x_0 (SD's scheduler has clip_sample=False)
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        pred_original_sample = pred_original_sample.clamp(-limit, limit)
    if scheduler.config.thresholding:
        raise ValueError("dynamic thresholding is not supported by the log-probability step; set thresholding=False")

    # 5. σ_t(η), DDIM formula (16)
    stds = step_std(scheduler, timestep, eta)
    if eta > 0:
        _check_variance(scheduler, timestep, stds)
    std_dev_t = _per_sample(stds, x_t)

    # 6. "direction pointing to x_t", formula (12): its coefficient sqrt(1 − ᾱ_{t−1} − σ_t²) in float64
    direction = _per_sample((1 - alpha_prod_t_prev - stds**2).sqrt(), x_t)

    # 7. μ_t = sqrt(ᾱ_{t−1}) x̂_0 + direction; x_{t−1} = μ_t + σ_t z unless prev_sample is given
    mean = _per_sample(alpha_prod_t_prev.sqrt(), x_t) * pred_original_sample + direction * pred_epsilon
    if prev_sample is None:
        noise = randn_tensor(x_t.shape, generator=generator, device=x_t.device, dtype=compute)
        prev_sample = (mean + std_dev_t * noise).to(sample.dtype)

    # 8. log N(x_{t−1}; μ_t, σ_t² I), averaged over dimensions:
    #    mean_d[ −(x_{t−1} − μ_t)² / (2σ_t²) − log σ_t − log sqrt(2π) ]
    std = std_dev_t.clamp(min=std_floor)
    x_prev = prev_sample.detach().to(compute)
    log_prob = -((x_prev - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return DDIMStepOutput(prev_sample=prev_sample.to(sample.dtype), log_prob=log_prob, mean=mean, std=std)
