"""The trained policy: loading it (a LoRA adapter or the whole UNet trains; VAE and text encoder stay frozen), its
frozen reference for DDPO-IS-KL, an epoch's recorded trajectories, and π(x_{t−1} | x_t, c) of a recorded step."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from trainer.config import Config
from trainer.ddim import DDIMStepOutput
from trainer.sampling import SampleBatch, load_pipeline, policy_step


def load_policy(config: Config, dtype: torch.dtype, device: torch.device) -> StableDiffusionPipeline:
    """The pipeline on ``device`` in ``dtype``, with frozen VAE and text encoder, and a UNet whose LoRA adapter (or
    whole self, in float32 master weights) trains."""
    pipeline = load_pipeline(config.model, config.revision, dtype=dtype)
    if config.sample.vae_slicing:
        pipeline.vae.enable_slicing()
    pipeline.vae.requires_grad_(False).to(device)
    pipeline.text_encoder.requires_grad_(False).to(device)
    unet = pipeline.unet.to(device)
    if config.lora.enabled:
        from peft import LoraConfig

        unet.requires_grad_(False)  # frozen base weights stay in the autocast dtype; the adapter is float32
        unet.add_adapter(
            LoraConfig(
                r=config.lora.rank,
                lora_alpha=config.lora.alpha,
                init_lora_weights="gaussian",
                target_modules=config.lora.target_modules,
            )
        )
        for param in unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    else:
        unet.requires_grad_(True)
        unet.to(dtype=torch.float32)  # full fine-tuning keeps float32 master weights under autocast
    if config.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return pipeline


def frozen_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """Full fine-tuning's reference model: a frozen copy of the pretrained UNet (with LoRA none is needed: the
    reference is the same UNet with its adapter switched off)."""
    return copy.deepcopy(unet).requires_grad_(False).eval()


@dataclasses.dataclass
class Epoch:
    """One epoch's recorded trajectories of this process, concatenated over sampling batches.

    An item whose reward failed (``--on-reward-error=drop``) stays, with weight 0: it adds nothing to the loss, and
    every process keeps the same number of minibatches, so none waits at a gradient all-reduce the others skip.
    """

    prompts: list[str]
    prompt_embeds: torch.Tensor  # (N, L, D), like every tensor here on the training device
    latents: torch.Tensor  # (N, T+1, C, h, w)
    log_probs: torch.Tensor  # (N, T)
    timesteps: torch.Tensor  # (N, T)
    rewards: npt.NDArray[np.float64]  # (N_scored,) the scored rewards of every process, for the epoch's statistics
    weights: torch.Tensor  # (N,) advantages (DDPO) or regression weights (RWR); 0 for dropped items
    dropped: int  # items of every process whose reward failed (--on-reward-error=drop)

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def of(
        cls,
        batches: Sequence[SampleBatch],
        rewards: npt.NDArray[np.float64],
        weights: npt.NDArray[np.float64],
        dropped: int,
        device: torch.device,
    ) -> Epoch:
        """The batches concatenated, copied to the training device once (not at every UNet call)."""
        return cls(
            prompts=[p for b in batches for p in b.prompts],
            prompt_embeds=torch.cat([b.prompt_embeds for b in batches]).to(device),
            latents=torch.cat([b.latents for b in batches]).to(device),
            log_probs=torch.cat([b.log_probs for b in batches]).to(device),
            timesteps=torch.cat([b.timesteps for b in batches]).to(device),
            rewards=rewards,
            weights=torch.as_tensor(weights, dtype=torch.float32, device=device),
            dropped=dropped,
        )


@dataclasses.dataclass
class Policy:
    """What a training UNet call needs: the trained UNet and the sampler's settings."""

    unet: torch.nn.Module  # as accelerate prepared it (DistributedDataParallel on several processes)
    base: UNet2DConditionModel  # the same UNet unwrapped, whose LoRA adapter can be switched off
    scheduler: DDIMScheduler
    negative_embeds: torch.Tensor  # (1, L, D): the empty prompt
    config: Config  # the run's, read at every call
    frozen_reference: torch.nn.Module | None = None  # full fine-tuning's pretrained copy (``frozen_copy``)

    @property
    def guidance_scale(self) -> float:
        """The sampler's guidance, or 1 (the conditional prediction alone) when train.cfg is off."""
        return self.config.sample.guidance_scale if self.config.train.cfg else 1.0

    @contextlib.contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The pretrained model: the frozen copy, or the UNet with its LoRA adapter off for the block's duration."""
        if self.frozen_reference is not None:
            yield self.frozen_reference
            return
        self.base.disable_adapters()
        try:
            yield self.unet
        finally:
            self.base.enable_adapters()

    def step(
        self, data: Epoch, samples: torch.Tensor, step_index: torch.Tensor, unet: torch.nn.Module | None = None
    ) -> DDIMStepOutput:
        """π(x_{t−1} | x_t, c) of the recorded step ``step_index`` (one per sample) of samples ``samples``, with the
        log-probability of the sampled x_{t−1}, under the sampler's settings; ``unet`` defaults to the trained one."""
        return policy_step(
            self.unet if unet is None else unet,
            self.scheduler,
            data.latents[samples, step_index],  # x_t
            data.timesteps[samples, step_index],
            data.prompt_embeds[samples],
            self.negative_embeds,
            self.guidance_scale,
            self.config.sample.eta,
            prev_latents=data.latents[samples, step_index + 1],  # x_{t−1}, as sampled
        )
