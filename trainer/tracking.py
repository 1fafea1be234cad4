"""Where a run's progress goes: ``metrics.jsonl`` (one line per epoch), ``eval.jsonl`` (one line per held-out
evaluation), TensorBoard, optionally Weights & Biases, image grids captioned "prompt | reward", and at the end of a
run ``reward_curve.png`` and ``eval_before_after.png``."""

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
    """Writes each epoch's metrics to every configured sink; ``close`` flushes them.

    Lines of metrics.jsonl and eval.jsonl (and TensorBoard events) from after ``start_epoch`` are dropped first, so
    that a run resumed from an earlier checkpoint does not repeat epochs.
    """

    def __init__(
        self, run_dir: Path, config: dict[str, Any], tensorboard: bool, wandb: bool, project: str, start_epoch: int
    ) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.eval_path = run_dir / "eval.jsonl"
        for path in (self.metrics_path, self.eval_path):
            kept = [line for line in _read_jsonl(path) if line["epoch"] <= start_epoch]
            if path.is_file():
                path.write_text("".join(json.dumps(line) + "\n" for line in kept))
        self.images_dir = run_dir / "images"
        self._tensorboard = None
        self._wandb: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops the events of epochs after its checkpoint (those of an epoch cut short included)
            purge_step = start_epoch + 1 if start_epoch else None
            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)
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
        numbers = {k: v for k, v in _flatten(metrics).items() if isinstance(v, int | float) and not isinstance(v, bool)}
        step = int(metrics["epoch"])
        if self._tensorboard is not None:
            for key, value in numbers.items():
                if key != "epoch" and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def log_images(
        self,
        epoch: int,
        images: npt.NDArray[np.uint8],
        prompts: Sequence[str],
        rewards: Sequence[float],
        tag: str = "samples",
    ) -> Path:
        """A grid captioned "prompt | reward" in images/<tag>_epoch_N.png (and TensorBoard / W&B under ``tag``)."""
        captions = [f"{prompt} | {reward:.2f}" for prompt, reward in zip(prompts, rewards, strict=True)]
        grid = image_grid(images, captions)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        path = self.images_dir / f"{'' if tag == 'samples' else tag + '_'}epoch_{epoch:06d}.png"
        grid.save(path)
        if self._tensorboard is not None:
            self._tensorboard.add_image(tag, np.asarray(grid), epoch, dataformats="HWC")
            self._tensorboard.add_text(f"{tag}/captions", "\n\n".join(captions), epoch)
        if self._wandb is not None:
            import wandb as wandb_module

            self._wandb.log({tag: wandb_module.Image(grid, caption=" / ".join(captions))}, step=epoch)
        return path

    def log_eval(self, summary: dict[str, Any], images: npt.NDArray[np.uint8], prompts: Sequence[str]) -> Path:
        """One held-out evaluation: its images under eval/epoch_N/, a line of eval.jsonl, scalars and a grid.
        Returns the folder eval/epoch_N/, where image i is ``{i:03d}.png``."""
        epoch = int(summary["epoch"])
        folder = self.run_dir / "eval" / f"epoch_{epoch:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        items = []
        for i, (image, prompt, reward) in enumerate(zip(images, prompts, summary["rewards"], strict=True)):
            Image.fromarray(image).save(folder / f"{i:03d}.png")
            items.append({"prompt": prompt, "reward": reward, "image": f"eval/epoch_{epoch:06d}/{i:03d}.png"})
        line = {key: value for key, value in summary.items() if key != "rewards"} | {"items": items}
        with self.eval_path.open("a") as file:
            file.write(json.dumps(line) + "\n")
        scalars = {"eval/reward_mean": summary["reward_mean"], "eval/reward_std": summary["reward_std"]}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, epoch)
        if self._wandb is not None:
            self._wandb.log(scalars, step=epoch)
        scored = [i for i, reward in enumerate(summary["rewards"]) if reward is not None]
        self.log_images(
            epoch, images[scored], [prompts[i] for i in scored], [summary["rewards"][i] for i in scored], "eval"
        )
        return folder

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"reward_replicas": {"a:1": {"sent": 8}}} -> {"reward_replicas/a:1/sent": 8}, for TensorBoard and W&B."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}/")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def plot_rewards(run_dir: Path, reward: str) -> Path:
    """reward_curve.png: the training samples' reward per epoch (mean ± std) and the held-out evaluations."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    metrics, evals = _read_jsonl(run_dir / "metrics.jsonl"), _read_jsonl(run_dir / "eval.jsonl")
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    epochs = np.array([m["epoch"] for m in metrics])
    mean = np.array([m["reward_mean"] for m in metrics])
    std = np.array([m["reward_std"] for m in metrics])
    axes.plot(epochs, mean, color="tab:blue", label="training samples (mean ± std)")
    axes.fill_between(epochs, mean - std, mean + std, color="tab:blue", alpha=0.2)
    if evals:
        axes.errorbar(
            [e["epoch"] for e in evals],
            [e["reward_mean"] for e in evals],
            yerr=[e["reward_std"] / math.sqrt(max(1, e["samples"])) for e in evals],
            color="tab:orange",
            marker="o",
            capsize=3,
            label="held-out prompts, fixed seeds (mean ± s.e.)",
        )
    axes.set_xlabel("epoch")
    axes.set_ylabel(reward)
    axes.set_title(f"DDPO on {reward}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = run_dir / "reward_curve.png"
    figure.savefig(path)
    plt.close(figure)
    return path


def before_after_grid(run_dir: Path, max_pairs: int = 18) -> Path | None:
    """eval_before_after.png: each held-out prompt's first sample at the first and the last evaluation, side by
    side (same noise), captioned with the rewards. None if the run has fewer than two evaluations."""
    evals = _read_jsonl(run_dir / "eval.jsonl")
    if len(evals) < 2:
        return None
    first, last = evals[0], evals[-1]
    seen: set[str] = set()
    images, captions = [], []
    for before, after in zip(first["items"], last["items"], strict=True):
        if before["prompt"] in seen or before["reward"] is None or after["reward"] is None:
            continue
        seen.add(before["prompt"])
        images += [np.asarray(Image.open(run_dir / item["image"]).convert("RGB")) for item in (before, after)]
        captions += [
            f"{before['prompt']} | {before['reward']:.2f}",
            f"after epoch {last['epoch']} | {after['reward']:.2f}",
        ]
        if len(seen) == max_pairs:
            break
    if not images:
        return None
    path = run_dir / "eval_before_after.png"
    image_grid(np.stack(images), captions, columns=6, min_width=192).save(path)
    return path
