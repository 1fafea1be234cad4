"""The built-in tiny model: a Stable-Diffusion-architecture pipeline small enough to train on a CPU.

Every component is the class Stable Diffusion uses (UNet2DConditionModel, AutoencoderKL, CLIPTextModel with a
CLIPTokenizer, DDIMScheduler with SD's scheduler settings), so the trainer runs exactly the code path it runs for
SD 1.x/2.x, only smaller: 64x64 images, 16x16x4 latents, about 2.3 M parameters.

``TINY_MODEL_PATH`` holds the pretrained weights in diffusers format (``scripts/pretrain_tiny.py`` made them; see
``provenance.json`` there); ``build_tiny_pipeline`` builds the same architecture with random weights.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_MODEL_PATH = Path(__file__).parent / "models" / "tiny-sd"

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

# CLIP's byte encoder maps printable ASCII to itself; "</w>" marks the end of a word.
_ALPHABET = [chr(code) for code in range(33, 127)]
_END = "</w>"


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges that make every word of ``words`` a single token.

    The usual BPE learning loop: merge the most frequent adjacent pair (ties broken alphabetically) until each word
    is one symbol. Applying the merges in this order, as CLIPTokenizer does, reproduces the same segmentation.
    """
    pieces = {word: [*word[:-1], word[-1] + _END] for word in sorted(set(words)) if word}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = collections.Counter(pair for symbols in pieces.values() for pair in itertools.pairwise(symbols))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, symbols in pieces.items():
            merged, i = [], 0
            while i < len(symbols):
                if tuple(symbols[i : i + 2]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            pieces[word] = merged


def tiny_tokenizer(words: Iterable[str] = (), model_max_length: int = 24) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is printable ASCII plus one token per word of ``words``.

    Any text still tokenizes (unknown words fall back to pieces and characters); the model's own caption words are
    single tokens, which a text encoder this small learns far more easily than characters.
    """
    merges = learn_merges(word.lower() for word in words)
    symbols = _ALPHABET + [s + _END for s in _ALPHABET] + ["".join(pair) for pair in merges]
    vocab = {symbol: i for i, symbol in enumerate(dict.fromkeys(symbols))}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # transformers 5 ignores vocab_file/merges_file here; vocab= and merges= are what it reads.
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def build_tiny_pipeline(
    seed: int = 0, words: Iterable[str] = (), prediction_type: str = "epsilon"
) -> StableDiffusionPipeline:
    """The tiny model's architecture with random weights (``words`` become single tokens)."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(words)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    # Three blocks: a 4x downsampling VAE (64x64x3 -> 16x16x4); the pipeline reads the factor from this config.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
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
