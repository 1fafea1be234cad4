"""The main job: a real reward server process, scored through the client and the CLI, then `ddpo train --config tiny`
against it: the built-in pretrained tiny model, with a held-out evaluation before and after training.

bash scripts/main.sh [--reward jpeg_compressibility] [--port 0] [--epochs N] [--run-dir runs/main]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clients import RewardClient


def demo_images() -> dict[str, np.ndarray]:
    """Images from very compressible to incompressible, 256x256 RGB."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:256, 0:256]
    return {
        "flat grey": np.full((256, 256, 3), 128, np.uint8),
        "gradient": np.stack([x, y, (x + y) // 2], -1).astype(np.uint8),
        "stripes": np.repeat((((x // 16) % 2) * 255)[..., None], 3, -1).astype(np.uint8),
        "circles": np.stack([(np.sin(np.hypot(x - 128, y - 128) / 4) * 127 + 128)] * 3, -1).astype(np.uint8),
        "noise": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", default="jpeg_compressibility")
    parser.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    parser.add_argument("--epochs", type=int, default=None, help="DDPO epochs (default: the tiny config's)")
    parser.add_argument("--run-dir", default="runs/main", help="the training run's folder (replaced)")
    args = parser.parse_args()

    ddpo = str(Path(sys.executable).with_name("ddpo"))
    print(f"$ ddpo serve --port {args.port} --metrics-port 0 --log-format text", flush=True)
    server = subprocess.Popen(
        [ddpo, "serve", "--port", str(args.port), "--metrics-port", "0", "--log-format", "text"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    address = ""
    for line in server.stdout:
        print(f"  server: {line.rstrip()}", flush=True)
        if line.startswith("ddpo reward server listening on "):
            address = line.split()[5]
            break
    if not address:
        print("the server did not start; see its log above", file=sys.stderr)
        return 1
    try:
        images = demo_images()
        with RewardClient(address) as client:
            started = time.monotonic()
            client.wait_ready(timeout=30, rewards=[args.reward])
            print(f"\nhealthy after {time.monotonic() - started:.2f}s; rewards offered:")
            for info in client.list_rewards():
                print(f"  {info.name:<24} {info.description} [{info.units}]")
            print(f"\nscoring {len(images)} images with {args.reward} (unary call):")
            batch = client.score(args.reward, list(images.values()))
            for name, result in zip(images, batch.items, strict=True):
                print(f"  {name:<10} {result.score:9.3f}" if result.ok else f"  {name:<10} {result.message}")
            print("\nthe same images through a ScoreStream, sent one by one:")
            with client.open_stream() as stream:
                for name, image in images.items():
                    stream.send(args.reward, [image], ids=[name])
                stream.close()
                for result in stream.results():
                    print(f"  {result.id:<10} {result.score:9.3f}")
        with tempfile.TemporaryDirectory() as folder:
            files = []
            for name, image in images.items():
                files.append(str(Path(folder) / f"{name.replace(' ', '_')}.png"))
                Image.fromarray(image).save(files[-1])
            print(f"\n$ ddpo score --server {address} --reward {args.reward} --json <{len(files)} PNG files>")
            cli = subprocess.run(
                [ddpo, "score", "--server", address, "--reward", args.reward, "--json", *files],
                capture_output=True,
                text=True,
                check=False,
            )
            for line in cli.stdout.splitlines():
                entry = json.loads(line)
                print(f"  {Path(entry['file']).name:<14} {entry.get('score', entry.get('error'))}")
            if cli.returncode != 0:
                print(cli.stderr, file=sys.stderr)
                return cli.returncode
        if train(ddpo, address, args.reward, args.epochs, Path(args.run_dir)) != 0:
            return 1
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
        print(f"\nserver stopped with SIGTERM, exit code {code}")
    return code


def train(ddpo: str, address: str, reward: str, epochs: int | None, run_dir: Path) -> int:
    """`ddpo train --config tiny` against the server; then print the reward curve and the held-out evaluation."""
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [ddpo, "train", "--config", "tiny", "--reward-server", address, "--reward", reward]
    command += ["--run-dir", str(run_dir)] + (["--epochs", str(epochs)] if epochs else [])
    print(f"\n$ {' '.join(['ddpo', *command[1:]])}", flush=True)
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        return done.returncode
    print(f"\nreward curve ({reward} of each epoch's training samples):")
    print(f"{'epoch':>5} {'reward_mean':>12} {'reward_std':>10} {'sample_s':>8} {'reward_wait_s':>13} {'train_s':>7}")
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        print(
            f"{m['epoch']:>5} {m['reward_mean']:>12.4f} {m['reward_std']:>10.4f} {m['sample_s']:>8.2f} "
            f"{m['reward_wait_s']:>13.3f} {m['train_s']:>7.2f}"
        )
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    before, after = evals[0], evals[-1]
    print(f"\nheld-out prompts, same noise before and after ({before['samples']} images, {reward}):")
    print(f"{'prompt':<28} {'before':>8} {'after':>8}")
    for prompt, value in before["per_prompt"].items():
        print(f"{prompt:<28} {value:>8.4f} {after['per_prompt'][prompt]:>8.4f}")
    change = (after["reward_mean"] - before["reward_mean"]) / abs(before["reward_mean"])
    print(
        f"{'mean':<28} {before['reward_mean']:>8.4f} {after['reward_mean']:>8.4f}  "
        f"({change:+.1%} after {after['epoch']} epochs)"
    )
    print(f"\nplots: {run_dir / 'reward_curve.png'}, {run_dir / 'eval_before_after.png'}")
    print(f"run folder: {run_dir} (metrics.jsonl, eval.jsonl, images/, eval/, tensorboard/, checkpoints/, final/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
