"""Learning efficacy on the built-in tiny model: held-out JPEG compressibility before and after DDPO, with LoRA and
with full fine-tuning of the UNet.

    python bench/efficacy.py                               # both modes, seeds 0 and 1, the default epoch budget
    python bench/efficacy.py --modes lora --seeds 0 1 2 --epochs 30 --plot /tmp/efficacy.png

Each run is ``Trainer(load_config("tiny", ...)).run()`` in this process, against one reward server process
(``python -m reward_server --rewards jpeg_compressibility``) on a free loopback port. The budget is a number of
epochs, so both modes see the same number of samples; the wall time of each run is printed too. The held-out
evaluation is the tiny config's ``[eval]``: the 18 shapes_heldout prompts (colour/shape pairs never trained on),
2 images each, from the same noise (``eval.seed``) before training and every ``--eval-every`` epochs; the run's
``seed`` changes the training samples only. JPEG compressibility is minus the file size in kB, so an improvement of
+10 % means held-out files 10 % smaller. The last line is the ratio of the mean improvements, full / LoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/efficacy.py` from anywhere
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no torchvision notices when the trainer imports

from tests.support import ServerProcess  # noqa: E402


def mode_overrides(mode: str, args: argparse.Namespace) -> list[str]:
    if mode == "lora":
        return ["lora.enabled=true", f"train.learning_rate={args.lora_lr}"]
    return ["lora.enabled=false", f"train.learning_rate={args.full_lr}"]


def run_once(mode: str, seed: int, address: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    import trainer.train
    from trainer.config import load_config

    overrides = [
        f"run_dir='{run_dir}'",
        f"reward.server='{address}'",
        f"seed={seed}",
        f"num_epochs={args.epochs}",
        f"eval.every={args.eval_every}",
        f"save_every={args.epochs}",
        "log.images_every=0",
        "log.tensorboard=false",
        *mode_overrides(mode, args),
    ]
    started = time.perf_counter()
    trainer.train.Trainer(load_config("tiny", overrides)).run()
    wall_s = time.perf_counter() - started
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    before, after = evals[0]["reward_mean"], evals[-1]["reward_mean"]
    return {
        "mode": mode,
        "seed": seed,
        "before": before,
        "after": after,
        "improvement": (after - before) / abs(before),
        "wall_s": wall_s,
        "curve": [(e["epoch"], e["reward_mean"]) for e in evals],
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    colours = {"lora": "tab:blue", "full": "tab:red"}
    for result in results:
        epochs, rewards = zip(*result["curve"], strict=True)
        axes.plot(
            epochs,
            rewards,
            marker="o",
            color=colours[result["mode"]],
            alpha=0.8,
            label=f"{result['mode']}, seed {result['seed']}",
        )
    axes.set_xlabel("epoch (16 samples each)")
    axes.set_ylabel("held-out jpeg_compressibility (−kB)")
    axes.set_title("DDPO on the built-in tiny model: held-out prompts, fixed noise")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=60, help="training epochs per run (the sample budget)")
    parser.add_argument("--eval-every", type=int, default=15, help="held-out evaluation every N epochs")
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="the tiny config's")
    parser.add_argument("--full-lr", type=float, default=3e-4)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=None, help="write held-out reward against epoch here (PNG)")
    args = parser.parse_args()
    if args.epochs < 1 or args.eval_every < 0 or args.torch_threads < 1 or len(args.seeds) < 1:
        parser.error("--epochs and --torch-threads must be >= 1, --eval-every >= 0, and at least one seed")

    import torch

    torch.set_num_threads(args.torch_threads)
    results = []
    with ServerProcess("--rewards", "jpeg_compressibility") as server, tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            for mode in args.modes:
                result = run_once(mode, seed, server.address, args, Path(folder) / f"{mode}-{seed}")
                results.append(result)
                print(
                    f"{mode:<5} seed {seed}: held-out {result['before']:.4f} -> {result['after']:.4f} "
                    f"({result['improvement']:+.1%}) in {result['wall_s'] / 60:.1f} min",
                    flush=True,
                )

    print(f"\n{args.epochs} epochs x 16 samples; held-out: 18 prompts x 2 images, fixed noise")
    print(f"{'mode':<5} {'runs':>4} {'before':>9} {'after':>9} {'improvement':>18} {'minutes':>8}")
    means = {}
    for mode in args.modes:
        runs = [r for r in results if r["mode"] == mode]
        gains = [r["improvement"] for r in runs]
        means[mode] = statistics.mean(gains)
        spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
        print(
            f"{mode:<5} {len(runs):>4} {statistics.mean(r['before'] for r in runs):>9.4f} "
            f"{statistics.mean(r['after'] for r in runs):>9.4f} {means[mode]:>+10.1%} ± {spread:>5.1%} "
            f"{statistics.mean(r['wall_s'] for r in runs) / 60:>8.1f}"
        )
    if len(means) == 2 and means["lora"]:
        print(f"ratio of mean improvements, full / lora: {means['full'] / means['lora']:.2f}")
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
