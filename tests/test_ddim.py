"""The DDIM log-probability step against diffusers' own DDIMScheduler and an independent Gaussian density."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from trainer.ddim import check_trainable_schedule, ddim_step_with_logprob
from trainer.tiny import SD_SCHEDULER_CONFIG


def _scheduler(prediction_type: str = "epsilon", **overrides: object) -> DDIMScheduler:
    scheduler = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, **overrides}, prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    return scheduler


def _reference_gaussian(
    scheduler: DDIMScheduler, model_output: torch.Tensor, t: int, sample: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of diffusers' own step at eta=1: the mean is its step with zero noise."""
    zero = torch.zeros_like(sample)
    mean = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=zero).prev_sample
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = scheduler._get_variance(t, prev_t) ** 0.5
    return mean, std


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_matches_diffusers_and_the_gaussian_density(prediction_type: str) -> None:
    scheduler = _scheduler(prediction_type)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 4, 8, 8, generator=generator)
    model_output = torch.randn(3, 4, 8, 8, generator=generator)
    for t in scheduler.timesteps.tolist():
        ours = ddim_step_with_logprob(
            scheduler, model_output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(1)
        )
        # same noise: our step draws it from the generator; replay that draw for diffusers
        replay = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        expected = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=replay).prev_sample
        # a few float32 ulps: our coefficients are float64, diffusers' float32 (test_half_precision_* checks ours)
        torch.testing.assert_close(ours.prev_sample, expected, rtol=2e-6, atol=1e-6)

        mean, std = _reference_gaussian(scheduler, model_output, t, sample)
        density = torch.distributions.Normal(mean.double(), float(std)).log_prob(ours.prev_sample.double())
        torch.testing.assert_close(ours.log_prob.double(), density.mean(dim=(1, 2, 3)), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.mean, mean, rtol=2e-6, atol=1e-6)


def test_given_prev_sample_recomputes_its_log_prob() -> None:
    scheduler = _scheduler()
    generator = torch.Generator().manual_seed(0)
    sample, model_output = torch.randn(2, 2, 4, 4, 4, generator=generator)
    t = int(scheduler.timesteps[3])
    drawn = ddim_step_with_logprob(scheduler, model_output, t, sample, generator=generator)
    again = ddim_step_with_logprob(scheduler, model_output, t, sample, prev_sample=drawn.prev_sample)
    assert torch.equal(again.prev_sample, drawn.prev_sample)
    assert torch.equal(again.log_prob, drawn.log_prob)
    other = drawn.prev_sample + 0.5 * drawn.std
    shifted = ddim_step_with_logprob(scheduler, model_output, t, sample, prev_sample=other)
    assert (shifted.log_prob < drawn.log_prob).all()


def test_per_sample_timesteps_equal_one_step_per_timestep() -> None:
    scheduler = _scheduler()
    generator = torch.Generator().manual_seed(0)
    sample, model_output, prev = torch.randn(3, 3, 4, 4, 4, generator=generator)
    timesteps = scheduler.timesteps[[0, 4, 9]]
    mixed = ddim_step_with_logprob(scheduler, model_output, timesteps, sample, prev_sample=prev)
    for i, t in enumerate(timesteps.tolist()):
        single = ddim_step_with_logprob(
            scheduler, model_output[i : i + 1], t, sample[i : i + 1], prev_sample=prev[i : i + 1]
        )
        torch.testing.assert_close(mixed.log_prob[i : i + 1], single.log_prob, rtol=0, atol=0)


def test_zero_variance_schedule_is_a_clear_error() -> None:
    scheduler = _scheduler(set_alpha_to_one=True, steps_offset=0)
    with pytest.raises(ValueError, match=r"zero variance at timestep\(s\) \[0\].*set_alpha_to_one=False"):
        check_trainable_schedule(scheduler, eta=1.0)
    sample = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ValueError, match="zero variance"):
        ddim_step_with_logprob(scheduler, sample, 0, sample)
    check_trainable_schedule(_scheduler(), eta=1.0)  # SD's settings: every step has variance
    with pytest.raises(ValueError, match="eta must be > 0"):
        check_trainable_schedule(_scheduler(), eta=0.0)


def _float64_step(
    scheduler: DDIMScheduler, model_output: torch.Tensor, t: int, sample: torch.Tensor, eta: float
) -> tuple[torch.Tensor, float]:
    """The mean and standard deviation of DDIM's step (formulas 12 and 16), written out in float64."""
    alphas = scheduler.alphas_cumprod.double()
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = alphas[t]
    a_prev = alphas[prev_t] if prev_t >= 0 else torch.as_tensor(scheduler.final_alpha_cumprod).double()
    std = eta * (((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)).sqrt()
    x0 = (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * model_output
    return mean, float(std)


# What the step in fp16/bf16 guarantees against float64 (docs/gpu.md): the mean is float32 arithmetic, within
# 1e-4 σ_t; x_{t−1} is that float32 draw rounded once to the dtype (within one unit of its last place); the
# log-probability is the float32 density of the rounded x_{t−1}, within 1e-4.
MEAN_TOLERANCE_SIGMAS = 1e-4
LOG_PROB_TOLERANCE = 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_steps", [10, 20, 50])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_half_precision_step_matches_float64_at_every_step(dtype: torch.dtype, num_steps: int, eta: float) -> None:
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_steps)
    generator = torch.Generator().manual_seed(num_steps)
    for t in scheduler.timesteps.tolist():  # the last one (t = 1) included
        sample = torch.randn(2, 4, 8, 8, generator=generator).to(dtype)
        model_output = torch.randn(2, 4, 8, 8, generator=generator).to(dtype)
        mean, std = _float64_step(scheduler, model_output.double(), t, sample.double(), eta)

        step = ddim_step_with_logprob(
            scheduler, model_output, t, sample, eta, generator=torch.Generator().manual_seed(t)
        )
        assert step.prev_sample.dtype == dtype
        assert torch.isfinite(step.prev_sample).all(), f"t={t}"
        assert torch.isfinite(step.log_prob).all(), f"t={t}"
        assert ((step.mean.double() - mean).abs() / std).max() < MEAN_TOLERANCE_SIGMAS, f"t={t}"

        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(t))  # the draw, replayed
        exact = mean + std * noise.double()
        one_rounding = torch.finfo(dtype).eps * exact.abs() + 1e-6  # + float32's own error, and subnormals
        assert ((step.prev_sample.double() - exact).abs() <= one_rounding).all(), f"t={t}: more than one rounding"

        density = torch.distributions.Normal(mean, std).log_prob(step.prev_sample.double()).mean(dim=(1, 2, 3))
        torch.testing.assert_close(step.log_prob.double(), density, rtol=0, atol=LOG_PROB_TOLERANCE)

        again = ddim_step_with_logprob(scheduler, model_output, t, sample, eta, prev_sample=step.prev_sample)
        assert torch.equal(again.log_prob, step.log_prob)  # recomputed from the stored latents: the same number
