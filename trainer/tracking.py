"""Where a run's progress goes: ``metrics.jsonl`` (one line per epoch), ``eval.jsonl`` (one line per held-out
evaluation), TensorBoard, optionally Weights & Biases, image grids captioned "prompt | reward", and at the end of a
run ``reward_curve.png`` and ``eval_before_after.png``."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from trainer.config import Config, LogConfig, to_dict
from trainer.evaluate import FEW_EPOCHS, FEW_EPOCHS_NOTE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from clients.evaluation import ImageRecord
    from trainer.sampling import SampleBatch

LINE_HEIGHT = 12  # px per caption line in Pillow's default bitmap font
CHAR_WIDTH = 6  # px per character of that font


def image_grid(
    images: npt.NDArray[np.uint8],
    captions: Sequence[str],
    columns: int = 4,
    caption_lines: int = 2,
    min_width: int = 128,
) -> Image.Image:
    """Tile (N, H, W, 3) images in rows of ``columns``, each with its caption in a strip of ``caption_lines`` lines
    underneath (``caption_text``).

    Small images are enlarged (nearest neighbour) to at least ``min_width`` px wide so that captions fit.
    """
    count, height, width, _ = images.shape
    scale = max(1, math.ceil(min_width / width))
    height, width = height * scale, width * scale
    rows = math.ceil(count / columns)
    cell_height = height + caption_lines * LINE_HEIGHT
    grid = Image.new("RGB", (columns * width, rows * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % columns) * width, (i // columns) * cell_height
        grid.paste(Image.fromarray(image).resize((width, height), Image.Resampling.NEAREST), (x, y))
        for n, line in enumerate(caption_text(caption, width // CHAR_WIDTH, caption_lines)):
            draw.text((x + 2, y + height + n * LINE_HEIGHT), line, fill="black")
    return grid


def caption_text(caption: str, width: int, lines: int) -> list[str]:
    """A "prompt | reward" caption as at most ``lines`` lines of ``width`` characters, wrapped at spaces.

    A caption too long even so loses the middle of its prompt, never its ends or the reward: the words that tell
    prompts apart (the subject first, the shape or the style last) stay readable.
    """
    wrapped = textwrap.wrap(caption, width)
    if len(wrapped) <= lines:
        return wrapped
    prompt, sep, reward = caption.rpartition(" | ")
    if not sep:
        prompt, reward = caption, ""
    keep = max(2, lines * width - len(sep) - len(reward) - 1)  # the prompt's characters, beside "…"
    head = (keep + 1) // 2
    text = f"{prompt[:head]}…{prompt[len(prompt) - (keep - head) :]}{sep}{reward}"
    return [text[i : i + width] for i in range(0, len(text), width)][:lines]


# metrics.jsonl's flat names -> TensorBoard's and W&B's, grouped in sections; names not listed stay as they are
TAGS = {
    "reward_mean": "reward/mean",
    "reward_std": "reward/std",
    "samples": "reward/samples",
    "dropped": "reward/dropped",
    "rewards_ready_frac": "reward/ready_frac",
    "reward_resent": "reward/resent",
    "reward_replicas": "reward/replicas",
    "loss": "loss/total",
    "policy_loss": "loss/policy",
    "kl": "loss/kl",
    "approx_kl": "loss/approx_kl",
    "clipfrac": "loss/clipfrac",
    "grad_norm": "loss/grad_norm",
    "ratio_check": "loss/ratio_check",
    "skipped_steps": "loss/skipped_steps",
    "sample_s": "time/sample_s",
    "reward_wait_s": "time/reward_wait_s",
    "train_s": "time/train_s",
    "prompts_tracked": "stat_tracking/prompts_tracked",
    "mean_buffer_len": "stat_tracking/mean_buffer_len",
    "global_step": "run/global_step",
    "processes": "run/processes",
}


def describe_epoch(metrics: dict[str, Any], reward: str) -> str:
    """An epoch's line in the run's log: its reward and where the time went."""
    m = metrics
    return (
        f"epoch {m['epoch']}: {reward} {m['reward_mean']:.4f} ± {m['reward_std']:.4f} over {m['samples']} samples "
        f"(sampling {m['sample_s']:.1f}s, reward wait {m['reward_wait_s']:.2f}s, training {m['train_s']:.1f}s)"
    )


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

    @classmethod
    def of_run(cls, config: Config, start_epoch: int) -> RunLogger:
        """The logger of ``config``'s run folder, with its configured sinks."""
        log = config.log
        return cls(Path(config.run_dir), to_dict(config), log.tensorboard, log.wandb, log.wandb_project, start_epoch)

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as file:
            file.write(json.dumps(metrics) + "\n")
        tagged = {TAGS.get(key, key): value for key, value in metrics.items() if key != "epoch"}
        numbers = {k: v for k, v in _flatten(tagged).items() if isinstance(v, int | float) and not isinstance(v, bool)}
        step = int(metrics["epoch"])
        if self._tensorboard is not None:
            for key, value in numbers.items():
                if math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def log_samples(
        self, epoch: int, batches: Sequence[SampleBatch], rewards: npt.NDArray[np.float64], log: LogConfig
    ) -> None:
        """Every ``log.images_every`` epochs, a grid of the first ``log.grid_size`` scored samples (rewards: NaN for
        a dropped one)."""
        if not log.images_every or epoch % log.images_every:
            return
        kept = np.flatnonzero(~np.isnan(rewards))[: log.grid_size]
        images = np.concatenate([batch.images for batch in batches])[kept]
        prompts = [prompt for batch in batches for prompt in batch.prompts]
        self.log_images(epoch, images, [prompts[i] for i in kept], rewards[kept].tolist())

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

    def log_eval(
        self,
        epoch: int,
        records: Sequence[ImageRecord],
        summary: dict[str, Any],
        reward: str,
        folder: Path,  # eval/epoch_N/, where the records' images are
    ) -> dict[str, Any]:
        """A held-out evaluation's line of eval.jsonl, derived from its results.jsonl records and summary.json's
        statistics (one schema, one computation), its scalars and its grid of scored images; returns the line."""
        stats = summary["rewards"][reward][f"epoch_{epoch}"]
        where = folder.relative_to(self.run_dir).as_posix()
        scores = [record.rewards.get(reward) for record in records]
        per_prompt = {p["prompt"]: p["mean"][reward][f"epoch_{epoch}"] for p in summary["per_prompt"]}
        line = {
            "epoch": epoch,
            "reward_mean": stats["mean"],
            "reward_std": stats["std"],
            "samples": stats["count"],
            "dropped": stats["failed"],
            "per_prompt": {prompt: mean for prompt, mean in per_prompt.items() if mean is not None},
            "items": [
                {"prompt": r.prompt, "reward": score, "image": f"{where}/{r.image}"}
                for r, score in zip(records, scores, strict=True)
            ],
        }
        with self.eval_path.open("a") as file:
            file.write(json.dumps(line) + "\n")
        scalars = {"eval/reward_mean": stats["mean"], "eval/reward_std": stats["std"]}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, epoch)
        if self._wandb is not None:
            self._wandb.log(scalars, step=epoch)
        scored = [(record, score) for record, score in zip(records, scores, strict=True) if score is not None]
        if scored:
            images = np.stack([np.asarray(Image.open(folder / record.image).convert("RGB")) for record, _ in scored])
            self.log_images(epoch, images, [str(r.prompt) for r, _ in scored], [score for _, score in scored], "eval")
        return line

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


def plot_run(config: Config) -> list[str]:
    """The plots at the end of a run, reward_curve.png and eval_before_after.png; returns the lines to log."""
    run_dir = Path(config.run_dir)
    lines = [f"reward curve: {plot_rewards(run_dir, config.reward.name)}"]
    if (grid := before_after_grid(run_dir)) is not None:
        lines.append(f"held-out samples before and after training: {grid}")
    if config.eval.enabled and config.num_epochs < FEW_EPOCHS:
        lines.append(FEW_EPOCHS_NOTE.format(epochs=config.num_epochs))
    return lines


def plot_rewards(run_dir: Path, reward: str) -> Path:
    """reward_curve.png: the training samples' reward per epoch (mean ± std) and the held-out evaluations."""
    from matplotlib import pyplot as plt

    figure = reward_curve(run_dir, reward)
    path = run_dir / "reward_curve.png"
    figure.savefig(path)
    plt.close(figure)
    return path


def reward_curve(run_dir: Path, reward: str) -> Figure:
    """The figure of ``plot_rewards``, with whole epochs on the x axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    axes.set_xlabel("epoch")
    axes.set_ylabel(reward)
    axes.set_title(f"DDPO on {reward}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


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
