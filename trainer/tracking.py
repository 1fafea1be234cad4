"""Where a run's progress goes: ``metrics.jsonl`` (one line per epoch), TensorBoard, optionally Weights & Biases,
and image grids captioned "prompt | reward"."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw


def image_grid(
    images: npt.NDArray[np.uint8],
    captions: Sequence[str],
    columns: int = 4,
    caption_height: int = 12,
    min_width: int = 128,
) -> Image.Image:
    """Tile (N, H, W, 3) images in rows of ``columns``, each with its caption in a strip underneath.

    Small images are enlarged (nearest neighbour) to at least ``min_width`` px wide so that captions fit; a caption
    that is still too long loses the end of its prompt, never the reward after the last " | ".
    """
    count, height, width, _ = images.shape
    scale = max(1, math.ceil(min_width / width))
    height, width = height * scale, width * scale
    rows = math.ceil(count / columns)
    cell_height = height + caption_height
    grid = Image.new("RGB", (columns * width, rows * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    max_chars = width // 6  # Pillow's default bitmap font is 6 px wide
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % columns) * width, (i // columns) * cell_height
        grid.paste(Image.fromarray(image).resize((width, height), Image.Resampling.NEAREST), (x, y))
        draw.text((x + 2, y + height), _shorten(caption, max_chars), fill="black")
    return grid


def _shorten(caption: str, max_chars: int) -> str:
    if len(caption) <= max_chars:
        return caption
    prompt, sep, reward = caption.rpartition(" | ")
    if not sep:
        return caption[: max_chars - 1] + "…"
    keep = max(1, max_chars - len(sep) - len(reward) - 1)
    return f"{prompt[:keep]}…{sep}{reward}"


class RunLogger:
    """Writes each epoch's metrics to every configured sink; ``close`` flushes them."""

    def __init__(self, run_dir: Path, config: dict[str, Any], tensorboard: bool, wandb: bool, project: str) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.images_dir = run_dir / "images"
        self._tensorboard = None
        self._wandb: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self._tensorboard.add_text("config", f"```\n{json.dumps(config, indent=1)}\n```")
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise ValueError("log.wandb = true needs the wandb package: pip install wandb") from None
            self._wandb = wandb_module.init(project=project, config=config, dir=str(run_dir))

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as file:
            file.write(json.dumps(metrics) + "\n")
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        step = int(metrics["epoch"])
        if self._tensorboard is not None:
            for key, value in numbers.items():
                if key != "epoch" and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def log_images(
        self, epoch: int, images: npt.NDArray[np.uint8], prompts: Sequence[str], rewards: Sequence[float]
    ) -> Path:
        captions = [f"{prompt} | {reward:.2f}" for prompt, reward in zip(prompts, rewards, strict=True)]
        grid = image_grid(images, captions)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        path = self.images_dir / f"epoch_{epoch:06d}.png"
        grid.save(path)
        if self._tensorboard is not None:
            self._tensorboard.add_image("samples", np.asarray(grid), epoch, dataformats="HWC")
            self._tensorboard.add_text("samples/captions", "\n\n".join(captions), epoch)
        if self._wandb is not None:
            import wandb as wandb_module

            self._wandb.log({"samples": wandb_module.Image(grid, caption=" / ".join(captions))}, step=epoch)
        return path

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
