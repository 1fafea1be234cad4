"""How fast health checks and ListRewards answer while the server decodes and scores at full load.

    python bench/health_under_load.py                      # both workloads, 10 s each
    python bench/health_under_load.py --seconds 20 --workloads png

A real ``ddpo serve --rewards jpeg_compressibility`` runs as its own process on a free loopback port. For each
workload, ``--loaders`` separate processes send Score calls back to back (each with the sync client):

- ``jpeg``: batches of 8 raw 512x512x3 images (the trainer's traffic);
- ``png``: batches of 4 PNG files of 2048x2048 that are small on the wire (flat colour) but decode to 12 MB each,
  the load that used to stall the event loop.

Meanwhile this process probes the server every 20 ms, alternating a health Check and a ListRewards call, each with
its own timer. It prints the probes' latency percentiles (p50, p90, p99, max, in ms), the images scored per second,
and the server's peak RSS. Kubernetes gives a liveness probe 1 s by default; the goal is p99 under 100 ms.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/health_under_load.py` from anywhere
    sys.path.insert(0, str(ROOT))

from clients import EncodedImage, RewardClient  # noqa: E402
from tests.support import ServerProcess  # noqa: E402


def workload(name: str) -> list[np.ndarray] | list[EncodedImage]:
    if name == "jpeg":
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(8)]
    from PIL import Image

    files = []
    for shade in (40, 80, 120, 160):
        buffer = io.BytesIO()
        Image.fromarray(np.full((2048, 2048, 3), shade, np.uint8)).save(buffer, format="PNG")
        files.append(EncodedImage(buffer.getvalue()))
    return files


def load(address: str, name: str, until: float, scored: multiprocessing.Value) -> None:  # type: ignore[valid-type]
    images = workload(name)
    with RewardClient(address, timeout=120) as client:
        while time.time() < until:
            batch = client.score("jpeg_compressibility", images)
            with scored.get_lock():
                scored.value += sum(item.ok for item in batch.items)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    summary = f"p50 {pick(0.5):7.1f}  p90 {pick(0.9):7.1f}  p99 {pick(0.99):7.1f}  max {ordered[-1]:7.1f}"
    return f"{summary}  (n={len(values)})"


def run(address: str, pid: int, name: str, seconds: float, loaders: int) -> None:
    from grpc_health.v1 import health_pb2

    until = time.time() + seconds
    scored = multiprocessing.Value("l", 0)
    processes = [multiprocessing.Process(target=load, args=(address, name, until, scored)) for _ in range(loaders)]
    for process in processes:
        process.start()
    latencies: dict[str, list[float]] = {"health": [], "ListRewards": []}
    peak = [rss_mb(pid)]

    def watch_memory() -> None:
        while time.time() < until:
            peak.append(rss_mb(pid))
            time.sleep(0.1)

    threading.Thread(target=watch_memory, daemon=True).start()
    with RewardClient(address, timeout=30) as client:
        time.sleep(1.0)  # the loaders are under way
        while time.time() < until - 0.5:
            started = time.perf_counter()
            client._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
            latencies["health"].append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            client.list_rewards(timeout=30)
            latencies["ListRewards"].append((time.perf_counter() - started) * 1000)
            time.sleep(0.02)
    for process in processes:
        process.join()
    print(f"{name}: {scored.value / seconds:.1f} images/s scored, server peak RSS {max(peak):.0f} MB")
    for probe, values in latencies.items():
        print(f"  {probe:11} ms  {percentiles(values)}")
    print(f"  share of probes over 100 ms: {statistics.mean(v > 100 for vs in latencies.values() for v in vs):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--loaders", type=int, default=4, help="load-generating processes")
    parser.add_argument("--workloads", default="jpeg,png")
    args = parser.parse_args()
    with ServerProcess("--rewards", "jpeg_compressibility") as server:
        assert server.proc is not None
        for name in args.workloads.split(","):
            run(server.address, server.proc.pid, name, args.seconds, args.loaders)


if __name__ == "__main__":
    main()
