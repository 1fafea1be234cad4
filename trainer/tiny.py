"""A tiny Stable-Diffusion-architecture pipeline built from configs (random weights), for CPU runs and tests.

Every component is the class Stable Diffusion uses (UNet2DConditionModel, AutoencoderKL, CLIPTextModel with a
CLIPTokenizer, DDIMScheduler with SD's scheduler settings), so the trainer runs exactly the code path it runs for
SD 1.x/2.x, only smaller.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Stable Diffusion v1's scheduler settings. set_alpha_to_one=False and steps_offset=1 give every DDIM step a
# non-zero variance, which DDPO needs for the log-probability of the last step.
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def tiny_tokenizer(model_max_length: int = 16) -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: one token per printable ASCII character, plus CLIP's special tokens."""
    symbols = [chr(code) for code in range(33, 127)]  # CLIP's byte encoder maps these bytes to themselves
    vocab = {symbol: i for i, symbol in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # transformers 5 ignores vocab_file/merges_file here; vocab= and merges= are what it reads.
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        model_max_length=model_max_length,
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def build_tiny_pipeline(
    seed: int = 0, image_size: int = 64, prediction_type: str = "epsilon"
) -> StableDiffusionPipeline:
    """An untrained SD-architecture pipeline: 64x64 images (8x8x4 latents), about 2.5 M parameters in all."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
    )
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
