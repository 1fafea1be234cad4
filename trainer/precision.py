"""Mixed precision the same way on a CPU as on a GPU, and non-finite values as errors.

``mixed_precision = "fp16"`` or ``"bf16"`` loads the frozen weights (VAE, text encoder, the UNet's base weights) in
that dtype and runs the UNet under autocast; trainable weights (the LoRA adapter, or the whole UNet) stay float32, and
fp16 scales the loss (a GradScaler), as diffusers' training scripts and ddpo-pytorch do. The DDIM step and the
log-probabilities are float32 whatever the policy's dtype (``trainer.ddim``).

accelerate runs bf16 on a CPU, but fp16 on a CPU with neither autocast nor loss scaling. torch has both on the CPU,
so ``make_accelerator`` turns them on: CI then runs the arithmetic that GPUs run, only slower.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

POLICY_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

ADVICE = (
    "Try mixed_precision = 'bf16' (float16 overflows above 65504) or 'no', a lower train.learning_rate, or a "
    "smaller train.max_grad_norm."
)


class NonFiniteError(RuntimeError):
    """A NaN or infinite latent, log-probability, loss or gradient: the run stops rather than train on it."""


def make_accelerator(mixed_precision: str, project_dir: str) -> Accelerator:
    """An Accelerator with ``mixed_precision`` on any device, the CPU included."""
    accelerator = Accelerator(mixed_precision=mixed_precision, project_dir=project_dir)
    if mixed_precision == "fp16" and accelerator.device.type == "cpu" and accelerator.scaler is None:
        accelerator.native_amp = True  # accelerator.autocast() becomes torch.autocast("cpu", torch.float16)
        accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator


def policy_dtype(mixed_precision: str) -> torch.dtype:
    return POLICY_DTYPES[mixed_precision]


def dtype_name(dtype: torch.dtype) -> str:
    """``float16``, ``bfloat16`` or ``float32``."""
    return str(dtype).removeprefix("torch.")


def check_trajectory(
    latents: torch.Tensor, log_probs: torch.Tensor, timesteps: torch.Tensor, dtype: torch.dtype
) -> None:
    """NonFiniteError naming the first DDIM step whose latents or log-probabilities are not finite.

    ``latents`` (B, T+1, ...), ``log_probs`` and ``timesteps`` (B, T) as ``trainer.sampling.SampleBatch`` holds them;
    ``dtype``: the UNet's.
    """
    bad_latents = ~torch.isfinite(latents[:, 1:].flatten(2)).all(dim=2).all(dim=0)  # (T,)
    bad_log_probs = ~torch.isfinite(log_probs).all(dim=0)
    bad = (bad_latents | bad_log_probs).nonzero()
    if len(bad):
        step = int(bad[0])
        what = "latents" if bad_latents[step] else "log-probabilities"
        raise NonFiniteError(
            f"DDIM step {step + 1} of {log_probs.shape[1]} (timestep {int(timesteps[0, step])}) gave non-finite "
            f"{what} with the UNet in {dtype_name(dtype)}. {ADVICE}"
        )
