"""A composite reward against its components called one after the other, on the same server in the same run.

    python bench/composite.py                      # 16 photographs of 512x512 per call, 15 calls per mode
    python bench/composite.py --images 32 --size 768 --calls 20

The server (``python -m reward_server`` on a free loopback port) serves ``jpeg_incompressibility`` (PIL's JPEG
encoder, one instance per core), the example plugin's ``brightness`` (numpy, one instance) and the composite
``both = {jpeg_incompressibility = 1, brightness = 1}``. Per mode, one client sends ``--calls`` unary Score calls of
the same batch, one after another:

- ``sequential``: a call to each component, one after the other, and the sum computed by the client;
- ``composite``: one call to ``both``; the server hands the items to both components at once.

The figure is the median wall time of one batch (after a warm-up call per mode); the modes take turns. The last
line is the ratio composite / sequential: below 1 when the components overlap.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/composite.py` from anywhere
    sys.path.insert(0, str(ROOT))

from clients import RewardClient  # noqa: E402
from tests.support import ServerProcess, plugin_env  # noqa: E402

CONFIG = """
[server]
plugins = ["ddpo_example_rewards"]
[rewards.jpeg_incompressibility]
[rewards.brightness]
[rewards.both]
type = "composite"
weights = { jpeg_incompressibility = 1.0, brightness = 1.0 }
"""


def photographs(count: int, size: int) -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    images = [np.asarray(image) for image in load_sample_images().images]  # two 427x640 photographs
    tiles = []
    for i in range(count):
        image = images[i % len(images)]
        top, left = (i * 37) % (image.shape[0] - size // 2), (i * 53) % (image.shape[1] - size // 2)
        crop = image[top : top + size // 2, left : left + size // 2]
        tiles.append(np.ascontiguousarray(np.kron(crop, np.ones((2, 2, 1), np.uint8))[:size, :size]))
    return tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args()
    images = photographs(args.images, args.size)
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "rewards.toml"
        config.write_text(CONFIG)
        with ServerProcess("--config", str(config), env=plugin_env()) as server, RewardClient(server.address) as client:

            def sequential() -> np.ndarray:
                jpeg = client.score("jpeg_incompressibility", images).scores
                return jpeg + client.score("brightness", images).scores

            def composite() -> np.ndarray:
                return client.score("both", images).scores

            modes = {"sequential": sequential, "composite": composite}
            np.testing.assert_allclose(sequential(), composite(), rtol=1e-12)  # the warm-up, and the same numbers
            times: dict[str, list[float]] = {name: [] for name in modes}
            for call in range(args.calls):
                for name in modes if call % 2 == 0 else reversed(modes):
                    started = time.perf_counter()
                    modes[name]()
                    times[name].append(time.perf_counter() - started)
    print(f"{args.images} images of {args.size}x{args.size}, {args.calls} calls per mode")
    for name, values in times.items():
        print(f"{name:<11} median {statistics.median(values) * 1000:7.1f} ms per batch  (min {min(values) * 1000:.1f})")
    ratio = statistics.median(times["composite"]) / statistics.median(times["sequential"])
    print(f"ratio composite / sequential: {ratio:.2f}")


if __name__ == "__main__":
    main()
