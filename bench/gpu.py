"""The training path at real size on a GPU: an SD-1.5-architecture pipeline trained for 2 epochs in fp16 and bf16,
with LoRA and with full fine-tuning, against a reward server on the same host.

    python bench/gpu.py                              # on a CUDA GPU: 512x512 images, SD 1.5's UNet (860 M params)
    python bench/gpu.py --size small                 # anywhere, the CPU included: the same architecture, 64x64
    python bench/gpu.py --precisions bf16 --modes lora --steps 20

Speed and memory do not depend on the weights, so the pipeline is built from configs with random weights: UNet
blocks 320/640/1280/1280 with cross-attention 768 (SD 1.5's), SD's VAE (128/256/512/512, 512x512 images), and a
12-layer, 768-wide CLIP text encoder (ViT-L/14's) with the built-in tiny model's tokenizer. Each (precision, mode) is
its own process (``--one``), so that its peak GPU memory is its own. It runs ``ddpo train``'s Trainer against
``ddpo serve --rewards jpeg_compressibility`` (a separate process) and prints, from the second epoch: sampling images/s,
seconds per optimizer step, peak GPU memory, the ratio check, skipped fp16 steps, and "non-finite" with the message if
the run stopped on a NaN or infinite value.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/gpu.py` from anywhere
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SIZES: dict[str, dict[str, Any]] = {
    # SD 1.5: UNet2DConditionModel's defaults are SD 1.x's, but for the cross-attention width (CLIP ViT-L/14: 768)
    "sd15": {
        "unet": {"block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "sample_size": 64},
        "vae": {"block_out_channels": (128, 256, 512, 512), "sample_size": 512},
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        "norm_num_groups": 32,
    },
    "small": {
        "unet": {"block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 64, "sample_size": 8},
        "vae": {"block_out_channels": (16, 32, 64, 64), "sample_size": 64},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
        "norm_num_groups": 8,
    },
}


def build_pipeline(size: str, folder: Path) -> None:
    """Save an SD-architecture pipeline with random weights to ``folder``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.tiny import SD_SCHEDULER_CONFIG, tiny_tokenizer

    spec = SIZES[size]
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **spec["text"],
        )
    )
    unet = UNet2DConditionModel(attention_head_dim=8, norm_num_groups=spec["norm_num_groups"], **spec["unet"])
    blocks = len(spec["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=spec["norm_num_groups"],
        **spec["vae"],
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    print(f"built {size}: UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters", flush=True)


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One (precision, mode) in this process: 2 epochs of the Trainer; figures from the last epoch."""
    import torch

    from trainer.config import load_config
    from trainer.precision import NonFiniteError
    from trainer.train import Trainer

    precision, mode = args.one
    run_dir = Path(args.work) / f"{precision}-{mode}"
    config = load_config(
        "tiny",
        [
            f"model='{args.model}'",
            f"run_dir='{run_dir}'",
            f"mixed_precision='{precision}'",
            f"lora.enabled={str(mode == 'lora').lower()}",
            f"reward.server='{args.server}'",
            "num_epochs=2",
            f"sample.num_steps={args.steps}",
            "sample.guidance_scale=5.0",
            f"sample.batch_size={args.batch_size}",
            "sample.num_batches_per_epoch=2",
            f"train.batch_size={args.train_batch_size}",
            f"train.gradient_accumulation_steps={2 * args.batch_size // args.train_batch_size}",
            "train.learning_rate=3e-4",
            "train.clip_range=1e-4",
            "lora.rank=4",
            "lora.alpha=4.0",
            "prompts.set='imagenet_animals'",
            "eval.enabled=false",
            "log.tensorboard=false",
            "log.images_every=0",
        ],
    )
    cuda = torch.cuda.is_available()
    result: dict[str, Any] = {"precision": precision, "mode": mode}
    try:
        Trainer(config).run()
    except NonFiniteError as error:
        result["non_finite"] = str(error)
        return result
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    steps = config.optimizer_steps_per_epoch()
    result |= {
        "images_per_s": last["samples"] / last["sample_s"],
        "s_per_optimizer_step": last["train_s"] / steps,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "ratio_check": last["ratio_check"],
        "skipped_steps": last["skipped_steps"],
        "non_finite": None,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15")
    parser.add_argument("--precisions", default="fp16,bf16")
    parser.add_argument("--modes", default="lora,full", help="lora, full (fine-tuning), or both")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per sample (the paper's 50)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per sampling batch (2 batches per epoch)")
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--one", nargs=2, metavar=("PRECISION", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    import torch

    if args.size == "sd15" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU at full size (--size sd15); run --size small for a smaller check")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    from tests.support import ServerProcess  # the same real-server harness the tests use

    with tempfile.TemporaryDirectory() as work, ServerProcess("--rewards", "jpeg_compressibility") as server:
        model = Path(work) / "model"
        build_pipeline(args.size, model)
        print(
            f"device {device}, size {args.size}, {args.steps} steps, batch {args.batch_size}, reward server "
            f"{server.address}",
            flush=True,
        )
        header = f"{'precision':9} {'mode':5} {'images/s':>9} {'s/step':>8} {'peak GiB':>9} {'ratio':>9} {'skipped':>7}"
        rows = []
        for precision in args.precisions.split(","):
            for mode in args.modes.split(","):
                command = [sys.executable, __file__, "--one", precision, mode, "--model", str(model)]
                command += ["--server", server.address, "--work", work, "--steps", str(args.steps)]
                command += ["--batch-size", str(args.batch_size), "--train-batch-size", str(args.train_batch_size)]
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    rows.append(f"{precision:9} {mode:5} failed (exit {done.returncode}): {done.stderr[-2000:]}")
                    continue
                r = json.loads(lines[-1].removeprefix("RESULT "))
                if r["non_finite"]:
                    rows.append(f"{precision:9} {mode:5} non-finite: {r['non_finite']}")
                    continue
                peak = "-" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.1f}"
                rows.append(
                    f"{precision:9} {mode:5} {r['images_per_s']:9.2f} {r['s_per_optimizer_step']:8.2f} {peak:>9} "
                    f"{r['ratio_check']:9.2g} {r['skipped_steps']:7d}"
                )
                print(rows[-1], flush=True)
        print(header)
        print("\n".join(rows))


if __name__ == "__main__":
    main()
