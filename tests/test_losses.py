"""Each algorithm's loss moves the policy the right way: one gradient step on a real (tiny) UNet."""

from __future__ import annotations

import copy

import pytest
import torch

from trainer import losses
from trainer.ddim import DDIMStepOutput
from trainer.sampling import SampleBatch, encode_prompts, policy_step, sample_batch
from trainer.tiny import build_tiny_pipeline

GUIDANCE, ETA, STEP = 3.0, 1.0, 2


@pytest.fixture(scope="module")
def setup() -> tuple[object, SampleBatch, torch.Tensor]:
    pipeline = build_tiny_pipeline(seed=0)
    negative = encode_prompts(pipeline, [""], torch.device("cpu"))
    batch = sample_batch(
        pipeline,
        pipeline.unet,
        ["cat", "dog", "cow", "fox"],
        negative,
        5,
        GUIDANCE,
        ETA,
        torch.Generator().manual_seed(0),
        torch.device("cpu"),
    )
    return pipeline, batch, negative


def _policy(unet: torch.nn.Module, pipeline: object, batch: SampleBatch, negative: torch.Tensor) -> DDIMStepOutput:
    """The recorded step STEP of every sample in ``batch``, recomputed under ``unet``."""
    return policy_step(
        unet,
        pipeline.scheduler,
        batch.latents[:, STEP],
        batch.timesteps[:, STEP],
        batch.prompt_embeds,
        negative,
        GUIDANCE,
        ETA,
        prev_latents=batch.latents[:, STEP + 1],
    )


def _log_prob(unet: torch.nn.Module, pipeline: object, batch: SampleBatch, negative: torch.Tensor) -> torch.Tensor:
    return _policy(unet, pipeline, batch, negative).log_prob


def _step(unet: torch.nn.Module, loss: torch.Tensor, lr: float = 1e-3) -> None:
    loss.backward()
    with torch.no_grad():
        for param in unet.parameters():
            if param.grad is not None:
                param -= lr * param.grad
                param.grad = None


@pytest.mark.parametrize("algorithm", ["ddpo_is", "ddpo_sf", "ddpo_is_kl"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_gradient_step_moves_the_log_prob_with_the_advantage(setup: tuple, algorithm: str, sign: float) -> None:
    pipeline, batch, negative = setup
    unet = copy.deepcopy(pipeline.unet)
    before = _log_prob(unet, pipeline, batch, negative).detach()
    # sample 0 is better (or worse) than average; the others are average
    advantages = torch.tensor([sign, 0.0, 0.0, 0.0])
    step = _policy(unet, pipeline, batch, negative)
    if algorithm == "ddpo_sf":
        loss = losses.ddpo_sf_loss(step.log_prob, batch.log_probs[:, STEP], advantages).loss
    else:
        loss = losses.ddpo_is_loss(step.log_prob, batch.log_probs[:, STEP], advantages, clip_range=1e-4).loss
    if algorithm == "ddpo_is_kl":  # at θ = θ_ref the penalty is at its minimum and adds no gradient
        with torch.no_grad():
            ref = _policy(pipeline.unet, pipeline, batch, negative)
        loss = loss + 0.1 * losses.exact_kl_penalty(step.mean, ref.mean, step.std)
    _step(unet, loss)
    after = _log_prob(unet, pipeline, batch, negative).detach()
    assert sign * (after[0] - before[0]) > 0


def test_clipping_stops_the_gradient_outside_the_trust_region() -> None:
    log_prob = torch.tensor([0.5, -0.5], requires_grad=True)
    old = torch.zeros(2)
    terms = losses.ddpo_is_loss(log_prob, old, torch.tensor([1.0, -1.0]), clip_range=0.1)
    terms.loss.backward()
    # ratio e^0.5 > 1.1 with A > 0 and e^-0.5 < 0.9 with A < 0: both already moved past the region, no gradient
    assert torch.equal(log_prob.grad, torch.zeros(2))
    assert terms.clipfrac.item() == 1.0
    assert terms.approx_kl.item() == pytest.approx(0.5 * 0.25)


def test_the_kl_penalty_pulls_the_policy_back_to_the_reference(setup: tuple) -> None:
    pipeline, batch, negative = setup
    unet = copy.deepcopy(pipeline.unet)
    with torch.no_grad():
        for param in unet.parameters():
            param += 0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1))

    def kl(estimator: str) -> torch.Tensor:
        step = _policy(unet, pipeline, batch, negative)
        with torch.no_grad():
            ref = _policy(pipeline.unet, pipeline, batch, negative)
        if estimator == "exact":
            return losses.exact_kl_penalty(step.mean, ref.mean, step.std)
        return losses.logprob_sq_kl_penalty(step.log_prob, ref.log_prob)

    for estimator in ("exact", "logprob_sq"):
        before = kl(estimator)
        assert before.item() > 0
        _step(unet, before, lr=1e-2)
        assert kl(estimator).item() < before.item()


def test_rwr_lowers_the_denoising_loss_of_the_weighted_sample(setup: tuple) -> None:
    pipeline, batch, _ = setup
    unet = copy.deepcopy(pipeline.unet)
    scheduler = pipeline.scheduler
    x0 = batch.latents[:, -1]
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=generator)
    timesteps = torch.tensor([500, 500, 500, 500])
    noisy = scheduler.add_noise(x0, noise, timesteps)

    def per_sample_error() -> torch.Tensor:
        prediction = unet(noisy, timesteps, encoder_hidden_states=batch.prompt_embeds).sample
        return ((prediction - noise) ** 2).mean(dim=(1, 2, 3))

    before = per_sample_error().detach()
    weights = torch.tensor([4.0, 0.0, 0.0, 0.0])  # only sample 0 is above the cutoff
    prediction = unet(noisy, timesteps, encoder_hidden_states=batch.prompt_embeds).sample
    _step(unet, losses.rwr_loss(prediction, noise, weights))
    assert per_sample_error()[0].item() < before[0].item()
