"""Loading a Stable-Diffusion-style pipeline and sampling trajectories with per-step log-probabilities.

The denoising loop is written out here rather than calling ``pipeline(...)``: DDPO needs every latent and the
log-probability of every step, and the same guided UNet call (``guided_noise_pred``) must serve sampling and the
log-probability recomputed during training, or the importance ratio is not 1 before the first update.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from trainer.config import SampleConfig
from trainer.ddim import DDIMStepOutput, check_trainable_schedule, ddim_step_with_logprob
from trainer.precision import NonFiniteError, check_trajectory

TINY_MODEL = "tiny"


def load_pipeline(
    model: str, revision: str | None = None, dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from a hub id or a local folder ("tiny": the built-in model, ``TINY_MODEL_PATH``),
    with a DDIM scheduler.

    The scheduler is rebuilt as DDIMScheduler from the model's own scheduler config (SD ships PNDM), as DDPO samples
    with DDIM. The safety checker is not loaded: rewards judge the images, and it would replace some with black ones.
    """
    if model == TINY_MODEL:
        from trainer.tiny import TINY_MODEL_PATH

        if not (TINY_MODEL_PATH / "model_index.json").is_file():
            raise ValueError(f"the built-in tiny model is missing from {TINY_MODEL_PATH}: reinstall ddpo")
        model = str(TINY_MODEL_PATH)
    elif not Path(model).exists() and model.count("/") != 1:
        raise ValueError(f"model {model!r} is neither an existing folder nor a hub id like 'org/name'")
    pipeline = StableDiffusionPipeline.from_pretrained(
        model, revision=revision, dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    if not isinstance(pipeline.unet, UNet2DConditionModel):
        raise ValueError(f"model {model!r} has no UNet2DConditionModel; DDPO needs a Stable-Diffusion-style UNet")
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def encode_prompts(pipeline: StableDiffusionPipeline, prompts: list[str], device: torch.device) -> torch.Tensor:
    """CLIP text embeddings of ``prompts``: (B, L, D)."""
    embeds: torch.Tensor = pipeline.encode_prompt(
        prompts, device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )[0]
    return embeds


def model_dtype(unet: torch.nn.Module) -> torch.dtype:
    """The dtype of the UNet's weights (of its frozen base weights under LoRA), through a DistributedDataParallel
    wrapper: what its inputs are cast to, as diffusers' pipelines do."""
    model: UNet2DConditionModel = getattr(unet, "module", unet)
    dtype: torch.dtype = model.dtype
    return dtype


def guided_noise_pred(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,  # (B, C, h, w)
    timesteps: torch.Tensor,  # (B,)
    prompt_embeds: torch.Tensor,  # (B, L, D)
    negative_embeds: torch.Tensor,  # (1, L, D): the empty prompt
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance: ε̂ = ε(x, ∅) + w (ε(x, c) − ε(x, ∅)), both halves in one UNet call of 2B.

    The UNet runs in its own dtype (fp16/bf16 under mixed precision); its prediction comes back in float32, and the
    guidance arithmetic is done there.
    """
    dtype = model_dtype(unet)
    if guidance_scale == 1.0:
        prediction: torch.Tensor = unet(
            latents.to(dtype), timesteps, encoder_hidden_states=prompt_embeds.to(dtype)
        ).sample
        return prediction.float()
    batch = latents.shape[0]
    noise_pred = unet(
        torch.cat([latents, latents]).to(dtype),
        torch.cat([timesteps, timesteps]),
        encoder_hidden_states=torch.cat([negative_embeds.expand(batch, -1, -1), prompt_embeds]).to(dtype),
    ).sample
    uncond, cond = noise_pred.float().chunk(2)
    guided: torch.Tensor = uncond + guidance_scale * (cond - uncond)
    return guided


def policy_step(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,  # (B, C, h, w) x_t
    timesteps: torch.Tensor,  # (B,)
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    guidance_scale: float,
    eta: float,
    prev_latents: torch.Tensor | None = None,  # (B, C, h, w) x_{t-1}, to recompute its log-probability
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> DDIMStepOutput:
    """One step of the policy π(x_{t−1} | x_t, c): the guided UNet call, then the DDIM step with its log-prob."""
    noise_pred = guided_noise_pred(unet, latents, timesteps, prompt_embeds, negative_embeds, guidance_scale)
    return ddim_step_with_logprob(
        scheduler, noise_pred, timesteps.cpu(), latents, eta=eta, prev_sample=prev_latents, generator=generator
    )


@dataclasses.dataclass
class SampleBatch:
    """One sampling batch: everything the update needs, on the CPU."""

    prompts: list[str]
    prompt_embeds: torch.Tensor  # (B, L, D)
    latents: torch.Tensor  # (B, T+1, C, h, w): x_T ... x_0, in float32 whatever the model's dtype
    log_probs: torch.Tensor  # (B, T): log π(x_{t−1} | x_t) at sampling time
    timesteps: torch.Tensor  # (B, T): the scheduler's timesteps, one row per sample
    images: npt.NDArray[np.uint8]  # (B, H, W, 3)


@torch.no_grad()
def sample_batch(
    pipeline: StableDiffusionPipeline,
    unet: UNet2DConditionModel,
    prompts: list[str],
    negative_embeds: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    generator: torch.Generator | list[torch.Generator],
    device: torch.device,
    allow_deterministic: bool = False,
) -> SampleBatch:
    """Run the DDIM chain for ``prompts`` from fresh noise, recording every latent and log-probability.

    ``generator``: one CPU generator for the whole batch (training), or one per image, as diffusers' ``randn_tensor``
    takes them: image i's initial latents and every step's noise then come from ``generator[i]`` alone, so an image
    does not depend on the batch it was sampled in (``ddpo eval``). ``allow_deterministic`` accepts eta = 0 (DDIM
    without noise, for evaluation); the log-probabilities recorded then mean nothing.

    The trajectory is kept in float32 whatever the model's dtype: the UNet runs in its own dtype, the DDIM step in
    float32, so the noise and the latents of a run in fp16 or bf16 are those of float32 up to the UNet's rounding.
    A non-finite latent or log-probability raises ``trainer.precision.NonFiniteError`` before anything is decoded.
    """
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(num_steps, device="cpu")
    if not (allow_deterministic and eta == 0):
        check_trainable_schedule(scheduler, eta)
    prompt_embeds = encode_prompts(pipeline, prompts, device)
    batch = len(prompts)
    shape = (batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} prompts: pass one per image, or one")
        latents = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
    else:
        latents = torch.randn(shape, generator=generator)
    latents = latents.to(device) * scheduler.init_noise_sigma
    all_latents, log_probs = [latents], []
    for t in scheduler.timesteps:
        timesteps = t.expand(batch).to(device)
        step = policy_step(
            unet,
            scheduler,
            latents,
            timesteps,
            prompt_embeds,
            negative_embeds,
            guidance_scale,
            eta,
            generator=generator,
        )
        latents = step.prev_sample
        all_latents.append(latents)
        log_probs.append(step.log_prob)
    trajectory = torch.stack(all_latents, dim=1).cpu()
    step_log_probs = torch.stack(log_probs, dim=1).cpu()
    timesteps = scheduler.timesteps.expand(batch, -1).clone()
    check_trajectory(trajectory, step_log_probs, timesteps, model_dtype(unet))
    return SampleBatch(
        prompts=list(prompts),
        prompt_embeds=prompt_embeds.cpu(),
        latents=trajectory,
        log_probs=step_log_probs,
        timesteps=timesteps,
        images=decode_images(pipeline, latents),
    )


@torch.no_grad()
def decode_images(pipeline: StableDiffusionPipeline, latents: torch.Tensor) -> npt.NDArray[np.uint8]:
    """VAE-decode x_0 latents (B, C, h, w) to (B, H, W, 3) uint8, like StableDiffusionPipeline's output_type="np"."""
    vae = pipeline.vae
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    pixels = (pixels / 2 + 0.5).clamp(0, 1)
    images: npt.NDArray[np.uint8] = (pixels.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return images


def sample_batches(
    pipeline: StableDiffusionPipeline,
    unet: UNet2DConditionModel,  # unwrapped: sampling needs no gradient synchronisation
    batches: Iterable[tuple[list[str], torch.Generator | list[torch.Generator]]],
    negative_embeds: torch.Tensor,
    config: SampleConfig,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    what: str,
    allow_deterministic: bool = False,
) -> Iterator[SampleBatch]:
    """One sampled batch per (prompts, generator(s)) pair (``sample_batch``), with the configured sampler, yielded as
    soon as it is decoded. A batch with a non-finite latent or log-probability raises NonFiniteError, naming ``what``
    and the batch, before it is yielded: it never reaches the reward service."""
    for n, (prompts, generator) in enumerate(batches):
        try:
            with autocast():
                batch = sample_batch(
                    pipeline,
                    unet,
                    prompts,
                    negative_embeds,
                    config.num_steps,
                    config.guidance_scale,
                    config.eta,
                    generator,
                    device,
                    allow_deterministic,
                )
        except NonFiniteError as error:
            raise NonFiniteError(
                f"{what}, sampling batch {n + 1}: these samples were not sent to the reward service: {error}"
            ) from None
        yield batch
