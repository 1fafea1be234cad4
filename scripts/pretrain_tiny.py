"""Pretrain the built-in tiny model (trainer/models/tiny-sd) on procedurally drawn, captioned shapes.

    python scripts/pretrain_tiny.py                        # the committed weights: seed 0, default steps
    python scripts/pretrain_tiny.py --out /tmp/tiny-sd --vae-steps 20 --unet-steps 20   # a quick try

The dataset is generated on the fly: one to three circles, squares or triangles of one colour and size, on a
background that is plain, striped, checkered, dotted or noisy. Captions name the count, the colour and the shape,
and sometimes the size, the background colour and its texture ("two small red circles on a striped blue
background"); 10 % are empty, for classifier-free guidance. A caption that leaves the background out lets the model
pick any texture, so images of the same prompt differ in how well they compress: that is the room DDPO has when it
trains for JPEG compressibility.

Training is Stable Diffusion's recipe, scaled down:
1. The VAE (AutoencoderKL, 64x64x3 -> 16x16x4) learns to reconstruct images (MSE plus a tiny KL term). Its
   ``scaling_factor`` is then set to 1 / std of the latents, as SD's 0.18215 was.
2. The UNet and the CLIP text encoder learn ε-prediction on the frozen VAE's latents under SD's noise schedule,
   with an exponential moving average of their weights, which is what gets saved.

The script saves the pipeline with ``save_pretrained`` (safetensors), writes ``provenance.json`` next to it, the
prompt sets (trainer/prompts/shapes*.txt) and a captioned grid of samples drawn with ``StableDiffusionPipeline``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.tiny import TINY_MODEL_PATH, build_tiny_pipeline  # noqa: E402
from trainer.tracking import image_grid  # noqa: E402

SIZE = 64
COMPONENTS = ("unet", "vae", "text_encoder")
COLOURS = {
    "red": (215, 40, 40),
    "orange": (240, 135, 30),
    "yellow": (235, 210, 45),
    "green": (45, 160, 65),
    "blue": (45, 80, 215),
    "purple": (135, 60, 175),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = {"a": 1, "two": 2, "three": 3}
SIZES = {"small": (5.0, 8.0), "large": (11.0, 15.0)}  # half-width range in pixels at 64x64
TEXTURES = {"plain": 0.4, "striped": 0.15, "checkered": 0.15, "dotted": 0.15, "noisy": 0.15}
WORDS = [*COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *COUNTS, "an", *SIZES, *TEXTURES, "on", "background"]
GRID_PROMPTS = [
    "a large red circle on a plain blue background",
    "a large blue square on a plain yellow background",
    "a large yellow triangle on a plain purple background",
    "a large white circle on a plain black background",
    "two green squares on a plain white background",
    "three small orange circles on a plain green background",
    "two large purple triangles on a plain orange background",
    "three small black squares on a plain yellow background",
    "a large orange square on a striped blue background",
    "a large green circle on a checkered white background",
    "a large red triangle on a dotted yellow background",
    "a large yellow circle on a noisy black background",
    "a red circle",
    "two blue triangles",
    "three yellow squares",
    "a purple square",
]


def prompt_sets() -> dict[str, list[str]]:
    """The DDPO prompt sets: "<count> <colour> <shape>" with no background named, so the model chooses one.

    A quarter of the colour/shape pairs (every count of them) are held out of ``shapes`` for evaluation.
    """
    sets: dict[str, list[str]] = {"shapes": [], "shapes_heldout": []}
    for i, colour in enumerate(COLOURS):
        for j, shape in enumerate(SHAPES):
            split = "shapes_heldout" if (i + j) % 4 == 0 else "shapes"
            for count, n in COUNTS.items():
                sets[split].append(_with_article(f"{count} {colour} {shape}{'s' if n > 1 else ''}"))
    return sets


def draw_scene(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One 64x64 image and its caption. Drawn at 2x and box-filtered down, so edges are anti-aliased."""
    scale = 2
    colour, background = rng.choice(list(COLOURS), size=2, replace=False)
    shape = str(rng.choice(SHAPES))
    count_word = str(rng.choice(list(COUNTS)))
    size_word = str(rng.choice(list(SIZES)))
    texture = str(rng.choice(list(TEXTURES), p=list(TEXTURES.values())))
    canvas = SIZE * scale
    image = Image.new("RGB", (canvas, canvas), COLOURS[background])
    draw = ImageDraw.Draw(image)
    pattern = _pattern_colour(COLOURS[background])
    period = int(rng.integers(6, 12)) * scale
    if texture == "striped":
        for x in range(-canvas, canvas, period):
            draw.polygon(
                [(x, 0), (x + period // 2, 0), (x + period // 2 + canvas, canvas), (x + canvas, canvas)], pattern
            )
    elif texture == "checkered":
        for y in range(0, canvas, period):
            for x in range((y // period % 2) * period, canvas, 2 * period):
                draw.rectangle([x, y, x + period - 1, y + period - 1], pattern)
    elif texture == "dotted":
        for y in range(period // 2, canvas, period):
            for x in range(period // 2, canvas, period):
                draw.ellipse([x - period / 4, y - period / 4, x + period / 4, y + period / 4], pattern)
    elif texture == "noisy":
        noise = rng.integers(-45, 46, size=(SIZE // 2, SIZE // 2, 1))
        noisy = np.clip(np.asarray(image, np.int16) + np.kron(noise, np.ones((2 * scale, 2 * scale, 1))), 0, 255)
        image = Image.fromarray(noisy.astype(np.uint8))
        draw = ImageDraw.Draw(image)
    low, high = SIZES[size_word]
    fill = tuple(int(c) for c in np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, 3), 0, 255))
    for _ in range(COUNTS[count_word]):
        r = rng.uniform(low, high) * scale
        cx, cy = rng.uniform(r, canvas - r, size=2)
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill)
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill)
    return image.resize((SIZE, SIZE), Image.Resampling.BOX), _caption(
        rng, count_word, size_word, colour, shape, texture, background
    )


def _pattern_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The background's colour made lighter (dark backgrounds) or darker (light ones), for its texture."""
    towards = 255 if sum(rgb) < 300 else 0
    return tuple(int(c + 0.45 * (towards - c)) for c in rgb)  # type: ignore[return-value]


def _caption(
    rng: np.random.Generator, count: str, size: str, colour: str, shape: str, texture: str, background: str
) -> str:
    if rng.random() < 0.1:
        return ""
    words = [count] + ([size] if rng.random() < 0.5 else []) + [colour, shape + ("s" if count != "a" else "")]
    if rng.random() < 0.6:
        words += ["on", "a"] + ([texture] if rng.random() < 0.7 else []) + [background, "background"]
    return _with_article(" ".join(words))


def _with_article(caption: str) -> str:
    """ "a orange circle on a orange background" -> "an orange circle on an orange background"."""
    words = caption.split()
    for i in range(len(words) - 1):
        if words[i] == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    return " ".join(words)


def scene_batch(rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, list[str]]:
    """(B, 3, 64, 64) images in [-1, 1], as the VAE expects, and their captions."""
    scenes = [draw_scene(rng) for _ in range(batch_size)]
    pixels = np.stack([np.asarray(image) for image, _ in scenes]).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(pixels).permute(0, 3, 1, 2), [caption for _, caption in scenes]


def train_vae(pipeline: StableDiffusionPipeline, args: argparse.Namespace, rng: np.random.Generator) -> float:
    """Stage 1: reconstruction + a tiny KL term; returns the final loss and sets the latent scaling factor."""
    vae = pipeline.vae
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(100, args.vae_steps // 10), args.vae_steps)
    loss = torch.zeros(())
    for _ in (bar := tqdm(range(args.vae_steps), desc="VAE", unit="step")):
        images, _ = scene_batch(rng, args.vae_batch_size)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        latents = vae.encode(scene_batch(rng, 256)[0]).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    vae.requires_grad_(False)
    return float(loss)


def train_diffusion(pipeline: StableDiffusionPipeline, args: argparse.Namespace, rng: np.random.Generator) -> float:
    """Stage 2: ε-prediction on the VAE's scaled latents, UNet and text encoder together; EMA weights kept."""
    unet, text_encoder, tokenizer, vae = pipeline.unet, pipeline.text_encoder, pipeline.tokenizer, pipeline.vae
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)  # the same β schedule
    params = [*unet.parameters(), *text_encoder.parameters()]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(200, args.unet_steps // 10), args.unet_steps)
    loss = torch.zeros(())
    for step in (bar := tqdm(range(args.unet_steps), desc="UNet + text encoder", unit="step")):
        images, captions = scene_batch(rng, args.batch_size)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
        # The same tokenization as StableDiffusionPipeline.encode_prompt, so sampling sees what training saw.
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        embeds = text_encoder(torch.tensor(ids.input_ids))[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(captions),))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=embeds).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        for p, averaged in zip(params, ema, strict=True):
            p.copy_(averaged)
    return float(loss)


def git_commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TINY_MODEL_PATH, help="the pipeline folder to write")
    parser.add_argument("--prompts-dir", type=Path, default=ROOT / "trainer" / "prompts")
    parser.add_argument("--grid", type=Path, default=ROOT / "docs" / "images" / "tiny_model_samples.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae-batch-size", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--grid-steps", type=int, default=20, help="DDIM steps for the sample grid")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="for the sample grid")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    for name in ("vae_steps", "vae_batch_size", "unet_steps", "batch_size", "grid_steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.ema_decay < 1:
        parser.error("--ema-decay must be in [0, 1)")

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    pipeline = build_tiny_pipeline(seed=args.seed, words=WORDS)
    started = time.monotonic()
    vae_loss = train_vae(pipeline, args, rng)
    vae_s = time.monotonic() - started
    diffusion_loss = train_diffusion(pipeline, args, rng)
    total_s = time.monotonic() - started

    pipeline.save_pretrained(args.out, safe_serialization=True)
    parameters = {
        name: sum(p.numel() for p in getattr(pipeline, name).parameters()) for name in ("unet", "vae", "text_encoder")
    }
    provenance = {
        "script": "scripts/pretrain_tiny.py",
        "script_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "command": " ".join(["python", "scripts/pretrain_tiny.py", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seed": args.seed,
        "vae": {"steps": args.vae_steps, "batch_size": args.vae_batch_size, "lr": args.vae_lr, "final_loss": vae_loss},
        "diffusion": {
            "steps": args.unet_steps,
            "batch_size": args.batch_size,
            "lr": args.unet_lr,
            "ema_decay": args.ema_decay,
            "final_loss": diffusion_loss,
        },
        "wall_time_s": {"vae": round(vae_s, 1), "diffusion": round(total_s - vae_s, 1), "total": round(total_s, 1)},
        "machine": {"cpu_threads": args.threads, "processor": platform.processor() or platform.machine()},
        "parameters": parameters,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
    }
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")

    args.prompts_dir.mkdir(parents=True, exist_ok=True)
    for name, prompts in prompt_sets().items():
        (args.prompts_dir / f"{name}.txt").write_text("\n".join(prompts) + "\n")

    loaded = StableDiffusionPipeline.from_pretrained(args.out)
    loaded.set_progress_bar_config(disable=True)
    images = loaded(
        GRID_PROMPTS,
        num_inference_steps=args.grid_steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="np",
    ).images
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    pixels = (images * 255).round().astype(np.uint8)
    image_grid(pixels, GRID_PROMPTS, columns=4, min_width=288).save(args.grid)
    print(f"pretrained in {total_s / 60:.1f} min: {args.out} ({sum(parameters.values()) / 1e6:.2f} M parameters)")
    print(f"samples: {args.grid}; prompt sets: {args.prompts_dir}/shapes*.txt")


if __name__ == "__main__":
    main()
