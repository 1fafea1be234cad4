"""Server-side micro-batching on a model reward: 16 concurrent clients, one image per request, batching on and off.

    python bench/batching.py                       # 16 clients x 24 requests, 2 repeats per mode
    python bench/batching.py --clients 32 --requests 16 --max-batch-size 32

The reward is ``aesthetic`` with a small CLIP vision tower built from a config (random weights, 224x224 input,
patch 32, ``--width`` 256, ``--layers`` 4, ViT-L/14's 768-d projection) and the real LAION head when
``../shared/assets/laion-aesthetic-v2/`` has it (else a random head of the same shape, with its own sha256). The
reward server runs as a separate process (``python -m reward_server --config ...`` on a free loopback port), once
per mode, with one instance:

- ``batched``: ``max_batch_size = --max-batch-size`` (16), ``max_queue_delay_ms = --max-queue-delay-ms`` (10);
- ``unbatched``: ``max_batch_size = 1``: every request is its own forward pass.

Each of ``--clients`` concurrent callers (asyncio tasks) sends ``--requests`` unary Score calls of one 256x256
photograph, one after another.
The figure is images per second over the whole run (first request sent to last answer received), after one warm-up
request per client; the server's batch-size histogram (Prometheus ``/metrics``) gives the mean batch. The modes take
turns, swapping order every repeat. The last line is the ratio of median throughputs, batched / unbatched.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/batching.py` from anywhere
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from reward_server.rewards.aesthetic import HEAD_FILE, HEAD_SHA256  # noqa: E402
from tests.support import ServerProcess  # noqa: E402

REAL_HEAD = ROOT.parent / "shared" / "assets" / "laion-aesthetic-v2" / HEAD_FILE


def build_backbone(folder: Path, width: int, layers: int) -> Path:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 32),
        image_size=224,
        patch_size=32,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
    return folder


def head_file(folder: Path) -> tuple[Path, str]:
    """The real head if it is here, else a random one of the same shape; with its sha256."""
    if REAL_HEAD.is_file():
        return REAL_HEAD, HEAD_SHA256
    import torch

    sizes = [768, 1024, 128, 64, 16, 1]
    state = {}
    for layer, (n_in, n_out) in zip((0, 2, 4, 6, 7), itertools.pairwise(sizes), strict=True):
        state[f"layers.{layer}.weight"] = torch.randn(n_out, n_in) / n_in**0.5
        state[f"layers.{layer}.bias"] = torch.zeros(n_out)
    path = folder / "random-head.pth"
    torch.save(state, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def server_config(folder: Path, backbone: Path, head: Path, digest: str, max_batch: int, delay_ms: float) -> Path:
    path = folder / f"server-{max_batch}.toml"
    path.write_text(
        f"[rewards.aesthetic]\nmax_batch_size = {max_batch}\nmax_queue_delay_ms = {delay_ms}\ninstances = 1\n\n"
        f'[rewards.aesthetic.options]\nclip_model = "{backbone}"\nhead_path = "{head}"\nhead_sha256 = "{digest}"\n'
    )
    return path


def mean_batch(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    total = sum(float(v) for v in re.findall(r'^ddpo_reward_batch_size_sum\{reward="aesthetic"\} (\S+)', text, re.M))
    count = sum(float(v) for v in re.findall(r'^ddpo_reward_batch_size_count\{reward="aesthetic"\} (\S+)', text, re.M))
    return total / count if count else float("nan")


def run_clients(address: str, image: np.ndarray, clients: int, requests: int) -> float:
    """Images per second for ``clients`` concurrent callers each sending ``requests`` single-image calls, one after
    another. The callers are asyncio tasks on one channel (``AsyncRewardClient``), so that the benchmark's own
    process spends little CPU on the 2 cores it shares with the server."""
    from clients.aio import AsyncRewardClient

    async def run() -> float:
        async with AsyncRewardClient(address) as client:

            async def caller() -> list[str]:
                failures = []
                for _ in range(requests):
                    (result,) = (await client.score("aesthetic", [image])).items
                    if not result.ok:
                        failures.append(result.message)
                return failures

            await asyncio.gather(*(client.score("aesthetic", [image]) for _ in range(clients)))  # warm-up
            started = time.perf_counter()
            failures = [
                message for found in await asyncio.gather(*(caller() for _ in range(clients))) for message in found
            ]
            elapsed = time.perf_counter() - started
        if failures:
            raise RuntimeError(f"{len(failures)} items failed, first: {failures[0]}")
        return clients * requests / elapsed

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=24, help="calls per client and run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-queue-delay-ms", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=256, help="the CLIP tower's hidden size")
    parser.add_argument("--layers", type=int, default=4, help="the CLIP tower's transformer layers")
    args = parser.parse_args()
    if min(args.clients, args.requests, args.repeats, args.max_batch_size, args.width, args.layers) < 1 or (
        args.max_queue_delay_ms < 0
    ):
        parser.error("--clients, --requests, --repeats and --max-batch-size must be >= 1, the delay >= 0")

    from PIL import Image
    from skimage.data import astronaut

    image = np.asarray(Image.fromarray(astronaut()).resize((256, 256)))
    modes = {"batched": args.max_batch_size, "unbatched": 1}
    figures: dict[str, list[float]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        backbone = build_backbone(folder / "clip", args.width, args.layers)
        head, digest = head_file(folder)
        print(f"head: {'the real LAION head' if head == REAL_HEAD else 'random (the real one is absent)'}")
        for repeat in range(args.repeats):
            order = list(modes) if repeat % 2 == 0 else list(reversed(modes))
            for mode in order:
                config = server_config(folder, backbone, head, digest, modes[mode], args.max_queue_delay_ms)
                with ServerProcess("--config", str(config), "--metrics-port", "0") as server:
                    throughput = run_clients(server.address, image, args.clients, args.requests)
                    batch = mean_batch(server.metrics_url)
                figures[mode].append(throughput)
                print(f"repeat {repeat + 1} {mode:<9}: {throughput:7.1f} images/s, mean batch {batch:5.2f}", flush=True)
    print(f"\n{args.clients} clients x {args.requests} single-image requests, {args.repeats} repeats (median)")
    for mode, values in figures.items():
        print(f"{mode:<9} {statistics.median(values):7.1f} images/s")
    ratio = statistics.median(figures["batched"]) / statistics.median(figures["unbatched"])
    print(f"ratio batched / unbatched: {ratio:.2f}")


if __name__ == "__main__":
    main()
