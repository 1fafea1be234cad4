"""Training epochs with one UNet call per trained timestep (train.timesteps_per_call = 1, ddpo-pytorch's way) against
the default, every trained timestep of a minibatch in one call ('auto' on a CPU).

    python bench/train_step.py                  # tiny model, 3 alternating runs per mode, 4 epochs each
    python bench/train_step.py --profile        # also a torch.profiler table of one epoch's training per mode

Each run is ``ddpo train --config tiny`` as its own process, with the same seed and config except
train.timesteps_per_call, against one real reward server process (``python -m reward_server``, JPEG
compressibility) on a free loopback port. The modes take turns, swapping order every repeat. The first epoch of a
run is warm-up and left out; the table shows the medians, over the other epochs of every run, of sample_s,
reward_wait_s, train_s and their sum epoch_s (from metrics.jsonl), samples/s, and the ratio of the median epoch
times. Both modes see the same samples in epoch 1; later epochs differ only by float rounding of the update, so the
reward curves are compared against their own noise (the standard error of an epoch's mean reward).

Before the runs, one optimizer step is taken in this process from the same samples in both modes: the gradients must
agree within 1e-5 of each tensor's largest (as tests/test_batched_training.py checks), and the LoRA weights
afterwards are compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/train_step.py` from anywhere
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no torchvision notices when the trainer imports

from tests.support import ServerProcess  # noqa: E402

MODES = {"per-timestep": "1", "batched": "'auto'"}
FIELDS = ("sample_s", "reward_wait_s", "train_s", "epoch_s")
QUIET = ["eval.enabled=false", "log.images_every=0", "log.tensorboard=false", "save_every=1000"]


def run(address: str, mode: str, epochs: int, seed: int, run_dir: Path) -> list[dict[str, Any]]:
    """One ``ddpo train`` process; the metrics of every epoch."""
    command = [sys.executable, "-m", "clients.cli", "train", "--config", "tiny", "--reward-server", address]
    command += ["--run-dir", str(run_dir), "--epochs", str(epochs), f"seed={seed}", *QUIET]
    command += [f"train.timesteps_per_call={MODES[mode]}"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{done.stderr[-4000:]}")
    epochs_ = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for epoch in epochs_:
        epoch["epoch_s"] = epoch["sample_s"] + epoch["reward_wait_s"] + epoch["train_s"]
    return epochs_


def one_step_weights(address: str, profile: bool) -> None:
    """One optimizer step from the same samples in both modes; prints how far apart the LoRA weights end up."""
    import numpy as np
    import torch

    from trainer.config import load_config
    from trainer.prompts import load_prompts
    from trainer.train import Trainer

    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as run_dir:
        trainer = Trainer(load_config("tiny", [f"run_dir='{run_dir}'", f"reward.server='{address}'", *QUIET]))
        prompts = load_prompts("shapes")
        generator = torch.Generator().manual_seed(0)  # drawn on batch after batch, as in training
        batches = list(trainer.sample([(prompts[:8], generator), (prompts[8:16], generator)], "bench"))
        data = trainer._epoch_data(batches, np.linspace(-1.0, 1.0, 16))
        unet = trainer.accelerator.unwrap_model(trainer.unet)
        start = {k: v.clone() for k, v in unet.state_dict().items() if "lora" in k}
        optimizer_state = trainer.optimizer.state_dict()
        after, grads = {}, {}
        for mode, per_call in (("per-timestep", 1), ("batched", "auto")):
            unet.load_state_dict(start, strict=False)
            trainer.optimizer.load_state_dict(optimizer_state)
            trainer.config.train = dataclasses.replace(trainer.config.train, timesteps_per_call=per_call)
            trainer.generators["training"].manual_seed(7)
            trainer.unet.train()
            order = torch.stack([torch.randperm(10, generator=torch.Generator().manual_seed(i)) for i in range(16)])
            trainer.update.accumulate_gradients(data, [torch.arange(8)], order)
            grads[mode] = [p.grad.clone() for p in trainer.unet.parameters() if p.requires_grad]
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            after[mode] = {k: v.clone() for k, v in unet.state_dict().items() if "lora" in k}
            if profile:
                print_profile(trainer, data, mode)
        gradient_error = max(  # (LoRA's A matrices get no gradient while B is still 0: 0 against 0)
            float((b - a).abs().max()) / max(float(a.abs().max()), 1e-30)
            for a, b in zip(grads["per-timestep"], grads["batched"], strict=True)
        )
        apart = max(float((after["per-timestep"][k] - after["batched"][k]).abs().max()) for k in start)
        lr = trainer.config.train.learning_rate
        verdict = "agree" if gradient_error <= 1e-5 else "DISAGREE"
        print(
            f"one optimizer step from the same samples: gradients {verdict} across modes (max |difference| "
            f"{gradient_error:.1e} of the tensor's largest gradient; tolerance 1e-5); LoRA weights after AdamW's "
            f"first step, which divides each gradient by its own size: max |difference| {apart:.1e} = "
            f"{apart / lr:.1e} x the learning rate",
            flush=True,
        )
        trainer.client.close()


def print_profile(trainer: Any, data: Any, mode: str) -> None:
    """torch.profiler's table, by self CPU time, of one epoch's training (two optimizer steps) in ``mode``."""
    from torch.profiler import ProfilerActivity, profile

    trainer.config.train = dataclasses.replace(trainer.config.train, ratio_check="off")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_on(data, 1)
    print(f"\n### profile: one epoch's training, {mode}\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode, alternating (default 3)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run, the first one warm-up (default 4)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of one epoch's training")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch is warm-up")
    results: dict[str, list[list[dict[str, Any]]]] = {mode: [] for mode in MODES}
    with ServerProcess("--rewards", "jpeg_compressibility") as server:
        one_step_weights(server.address, args.profile)
        for repeat in range(args.repeats):
            for mode in list(MODES) if repeat % 2 == 0 else list(MODES)[::-1]:
                with tempfile.TemporaryDirectory(prefix="bench-train-step-") as run_dir:
                    epochs = run(server.address, mode, args.epochs, args.seed, Path(run_dir))
                results[mode].append(epochs)
                times = " ".join(f"{e['epoch_s']:.2f}" for e in epochs[1:])
                print(f"repeat {repeat + 1}/{args.repeats} {mode}: epoch_s {times}", flush=True)

    samples = results["batched"][0][0]["samples"]
    print(
        f"\ntiny model, {samples} samples x 10 steps per epoch, {args.repeats} runs x {args.epochs - 1} epochs per "
        f"mode (first epoch of each run dropped), {os.cpu_count()} CPUs; medians"
    )
    print(f"{'mode':<14}" + "".join(f"{field:>15}" for field in (*FIELDS, "samples/s")))
    medians = {}
    for mode, runs in results.items():
        kept = [epoch for epochs in runs for epoch in epochs[1:]]
        row = {field: statistics.median(e[field] for e in kept) for field in FIELDS}
        row["samples/s"] = samples / row["epoch_s"]
        medians[mode] = row
        print(f"{mode:<14}" + "".join(f"{row[field]:>15.3f}" for field in (*FIELDS, "samples/s")))
    for field in ("epoch_s", "train_s"):
        ratio = medians["per-timestep"][field] / medians["batched"][field]
        print(f"ratio per-timestep/batched {field}: {ratio:.2f}")

    print("\nreward curve (first run of each mode): epoch, mean reward per mode, difference / standard error")
    for a, b in zip(results["per-timestep"][0], results["batched"][0], strict=True):
        error = max(a["reward_std"], b["reward_std"]) / a["samples"] ** 0.5
        difference = (b["reward_mean"] - a["reward_mean"]) / error
        print(f"{a['epoch']:>3} {a['reward_mean']:>10.4f} {b['reward_mean']:>10.4f} {difference:>8.2f}")


if __name__ == "__main__":
    main()
