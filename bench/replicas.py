"""Throughput of a slow reward over 1, 2 and 4 real server processes, with the same client and the same images.

    python bench/replicas.py                      # 1, 2 and 4 replicas; 64 batches of 8; 0.2 s per batch
    python bench/replicas.py --replicas 1,2,4,8 --batches 128

Each replica is ``ddpo serve --plugin bench.sleep_reward`` on a free loopback port, serving ``sleepy``: it sleeps
``--sleep-s`` per batch of at most 8 images, one batch at a time (``instances = 1``), so that the measurement is
about the client's fan-out, not the two cores. The client is ``clients.open_client("a:1,b:2,...")``: one stream
over every replica, each batch on the replica with the least outstanding work. It sends ``--batches`` batches of 8
64x64 images, reads every answer, and prints images/s and the ratio against one replica (the first row).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/replicas.py` from anywhere
    sys.path.insert(0, str(ROOT))

from clients import open_client  # noqa: E402
from tests.support import ServerProcess  # noqa: E402


def throughput(addresses: list[str], batches: int) -> tuple[float, dict[str, int]]:
    images = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    with open_client(",".join(addresses)) as client:
        client.wait_ready(timeout=60, rewards=["sleepy"])
        started = time.perf_counter()
        with client.open_stream() as stream:
            for _ in range(batches):
                stream.send("sleepy", images)
            stream.close()
            answered = sum(result.ok for result in stream.results())
            elapsed = time.perf_counter() - started
            shares = {address: int(stats.answered) for address, stats in stream.stats.items()}
    assert answered == 8 * batches, answered
    return answered / elapsed, shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--sleep-s", type=float, default=0.2)
    args = parser.parse_args()
    counts = [int(n) for n in args.replicas.split(",")]
    env = {**os.environ, "SLEEP_REWARD_S": str(args.sleep_s), "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "sleepy.toml"
        config.write_text(
            '[server]\nplugins = ["bench.sleep_reward"]\n[rewards.sleepy]\nmax_batch_size = 8\ninstances = 1\n'
        )
        with contextlib.ExitStack() as stack:
            servers = [stack.enter_context(ServerProcess("--config", str(config), env=env)) for _ in range(max(counts))]
            baseline = None
            print(f"{'replicas':>8} {'images/s':>9} {'ratio':>6}  items answered per replica")
            for count in counts:
                rate, shares = throughput([server.address for server in servers[:count]], args.batches)
                baseline = baseline or rate
                print(f"{count:8d} {rate:9.1f} {rate / baseline:6.2f}  {sorted(shares.values(), reverse=True)}")


if __name__ == "__main__":
    main()
