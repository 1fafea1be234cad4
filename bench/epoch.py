"""One DDPO epoch with rewards streamed while sampling, against the same epoch with rewards scored after sampling.

    python bench/epoch.py                          # tiny model, 3 epochs x 4 batches, reward delay 250 ms, 2 repeats
    python bench/epoch.py --reward-delay-ms 0      # plain JPEG scoring (under 1 ms a batch of 8 64x64 images)

Both modes run ``Trainer(load_config("tiny", ...)).run()`` in this process, with the same seed, against one reward
server: a separate process (this file with ``--serve``) on a free loopback port, talking gRPC. It serves
jpeg_compressibility, sleeping ``--reward-delay-ms`` per scored batch to stand in for a model reward (aesthetic,
LLaVA) that costs about as much as sampling a batch (about 240 ms here). Batches are not merged (max_batch_size = the
sample batch size, one instance). The modes take turns, swapping order every repeat. Torch uses ``--torch-threads``
(default 1: two threads collapse when another process competes for a 2-core machine). The first epoch of every run
is warm-up and left out. The table shows the median over the remaining epochs of each phase from ``metrics.jsonl``:
sample_s, reward_wait_s (what ``collect`` blocked for), train_s, their sum epoch_s, and rewards_ready_frac. The last
line is the ratio of the median epoch times, streaming / after sampling (lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/epoch.py` from anywhere
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no torchvision notices when the trainer imports

from tests.support import DelayedJpeg  # noqa: E402

MODES = {"streaming": True, "after-sampling": False}
FIELDS = ("sample_s", "reward_wait_s", "train_s", "epoch_s", "rewards_ready_frac")
_LISTENING = re.compile(r"listening on (\S+:\d+)")
T = TypeVar("T")


def serve(port: int, delay_ms: float, batch_size: int) -> None:
    """The reward server process: prints "ddpo reward server listening on HOST:PORT" once it serves."""
    import asyncio

    from reward_server.batching import BatchingConfig
    from reward_server.config import ServerConfig
    from reward_server.logs import configure_logging
    from reward_server.server import RewardServer
    from reward_server.server import serve as serve_forever

    configure_logging("warning", "text")
    rewards = [(DelayedJpeg(delay_ms / 1000), BatchingConfig(max_batch_size=batch_size, instances=1))]

    def announce(server: RewardServer) -> None:
        print(f"ddpo reward server listening on {server.config.host}:{server.port}", flush=True)

    asyncio.run(serve_forever(ServerConfig(port=port), rewards, on_started=announce))


def start_server(delay_ms: float, batch_size: int) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, __file__, "--serve", "--port", "0", "--reward-delay-ms", str(delay_ms)]
    process = subprocess.Popen([*command, "--max-batch-size", str(batch_size)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if match := _LISTENING.search(line):
            threading.Thread(target=process.stdout.read, daemon=True).start()  # keep draining its stdout
            return process, match.group(1)
    raise RuntimeError(f"the reward server exited ({process.wait()}) without announcing its port")


def no_progress(iterable: Iterable[T], **kwargs: Any) -> Iterable[T]:
    from tqdm.auto import tqdm

    bar: Iterable[T] = tqdm(iterable, **{**kwargs, "disable": True})
    return bar


def run_mode(address: str, stream: bool, args: argparse.Namespace, run_dir: str) -> list[dict[str, Any]]:
    """Train ``--epochs`` epochs in one mode; the metrics of every epoch but the first."""
    import trainer.train
    from trainer.config import load_config

    trainer.train.tqdm = no_progress  # type: ignore[attr-defined]  # its bars ignore TQDM_DISABLE on the main process
    overrides = [f"reward.server='{address}'", f"reward.stream={str(stream).lower()}", f"run_dir='{run_dir}'"]
    overrides += [f"num_epochs={args.epochs}", f"sample.num_batches_per_epoch={args.batches}", f"seed={args.seed}"]
    overrides += ["log.tensorboard=false", "log.images_every=0", "save_every=1000", "eval.enabled=false"]
    trainer.train.Trainer(load_config("tiny", overrides)).run()
    epochs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    for epoch in epochs:
        epoch["epoch_s"] = epoch["sample_s"] + epoch["reward_wait_s"] + epoch["train_s"]
    return epochs[1:]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reward-delay-ms", type=float, default=250.0, help="sleep per scored batch (default 250)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run, the first one warm-up (default 3)")
    parser.add_argument("--batches", type=int, default=4, help="sample.num_batches_per_epoch (default 4)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternating (default 2)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--torch-threads", type=int, default=1, help="torch.set_num_threads (default 1, see docs)")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--max-batch-size", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.port, args.reward_delay_ms, args.max_batch_size)
        return
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch is warm-up")
    import torch

    from trainer.config import load_config

    torch.set_num_threads(args.torch_threads)
    batch_size = load_config("tiny").sample.batch_size
    process, address = start_server(args.reward_delay_ms, batch_size)
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    try:
        for repeat in range(args.repeats):
            order = list(MODES) if repeat % 2 == 0 else list(MODES)[::-1]
            for mode in order:
                with tempfile.TemporaryDirectory(prefix="bench-epoch-") as run_dir:
                    epochs = run_mode(address, MODES[mode], args, run_dir)
                results[mode] += epochs
                if not args.quiet:
                    times = " ".join(f"{e['epoch_s']:.2f}" for e in epochs)
                    print(f"repeat {repeat + 1}/{args.repeats} {mode}: epoch_s {times}", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=60)

    print(
        f"tiny model, {args.batches} batches x {batch_size} images per epoch, reward delay {args.reward_delay_ms:g} ms"
        f"/batch, {args.repeats} repeats x {args.epochs - 1} epochs per mode (first epoch of each run dropped), "
        f"{os.cpu_count()} CPUs; medians"
    )
    same = [e["reward_mean"] for e in results["streaming"]] == [e["reward_mean"] for e in results["after-sampling"]]
    print(f"same rewards in both modes: {'yes' if same else 'NO'}")
    print(f"{'mode':<16}" + "".join(f"{field:>20}" for field in FIELDS))
    medians = {mode: {f: statistics.median(e[f] for e in epochs) for f in FIELDS} for mode, epochs in results.items()}
    for mode, row in medians.items():
        print(f"{mode:<16}" + "".join(f"{row[field]:>20.3f}" for field in FIELDS))
    ratio = medians["streaming"]["epoch_s"] / medians["after-sampling"]["epoch_s"]
    print(f"ratio streaming/after-sampling epoch time: {ratio:.2f}")


if __name__ == "__main__":
    main()
