"""Transport overhead of the reward service: the same batch scored through gRPC and in-process, in one run.

    python bench/transport.py                                   # defaults: jpeg_compressibility, 32 x 512x512
    python bench/transport.py --config bench.toml --stream-chunk 4
    python bench/transport.py --server-args "--max-concurrent-rpcs 64" --json results.json
    python bench/transport.py --paths inproc,unary,stream,unary-aio,stream-aio

Every round scores the same ``--batch`` real photographs (512x512x3 uint8, crops and flips of skimage.data and
sklearn sample images) along every path, in a rotating order so that a noisy machine slows all paths alike:

    inproc      build_reward(REWARD).score(images, ...) in this process (one thread, no copies, no wire)
    unary       RewardClient.score(REWARD, images): one Score call carrying the whole batch
    stream      RewardClient.open_stream(): --stream-chunk images per ScoreStreamRequest, all sent, then read
    unary-aio   AsyncRewardClient.score                    (not in the default --paths)
    stream-aio  AsyncRewardClient.open_stream              (not in the default --paths)

The service is the real server (``python -m reward_server``) started as a separate process on a free port (or an
already running one with ``--server``). Service scores must equal the in-process scores exactly, or the run fails.
It prints the median images/s of each path over ``--rounds`` timed rounds (after ``--warmup`` rounds), the ratio of
each service path to in-process (the target is >= 0.9), and the CPU seconds per image spent by this process (the
client; for inproc, the reward itself) and by the server process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/transport.py` from anywhere
    sys.path.insert(0, str(ROOT))

from clients import AsyncRewardClient, RewardClient  # noqa: E402
from reward_server.rewards import build_reward  # noqa: E402

Image = npt.NDArray[np.uint8]
PATHS = ("inproc", "unary", "stream", "unary-aio", "stream-aio")
DEFAULT_PATHS = ("inproc", "unary", "stream")
TARGET_RATIO = 0.9
_LISTENING = re.compile(r"listening on (\S+):(\d+)")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- images -----------------------------------------------------------------------------------------------------


def _photographs() -> list[tuple[str, Image]]:
    """Real RGB photographs: skimage.data and sklearn's sample images."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
    photos = [(name, np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)) for name in names]
    samples = load_sample_images()
    photos += [
        (Path(f).stem, np.asarray(img, dtype=np.uint8))
        for f, img in zip(samples.filenames, samples.images, strict=True)
    ]
    return [(name, photo[..., :3]) for name, photo in photos]


def make_images(count: int, size: int, seed: int = 0) -> list[Image]:
    """``count`` distinct size x size x 3 uint8 images: square crops (whole, then random) of the photographs, resized
    with Pillow, every other one mirrored."""
    from PIL import Image as PILImage

    photos = _photographs()
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        _, photo = photos[i % len(photos)]
        variant = i // len(photos)
        height, width = photo.shape[:2]
        side = min(height, width)
        if variant > 0:  # a random square crop covering 60-100% of the short side
            side = int(side * rng.uniform(0.6, 1.0))
        top = (height - side) // 2 if variant == 0 else int(rng.integers(0, height - side + 1))
        left = (width - side) // 2 if variant == 0 else int(rng.integers(0, width - side + 1))
        crop = PILImage.fromarray(np.ascontiguousarray(photo[top : top + side, left : left + side]))
        if crop.size != (size, size):
            crop = crop.resize((size, size), PILImage.Resampling.BICUBIC)
        image = np.asarray(crop, dtype=np.uint8)
        if variant % 2 == 1:
            image = image[:, ::-1]
        images.append(np.ascontiguousarray(image))
    return images


# --- the server -------------------------------------------------------------------------------------------------


class ServerProcess:
    """``python -m reward_server --port 0 ...`` in a child process; stopped with SIGTERM."""

    def __init__(self, reward: str, config: Path | None, extra_args: Sequence[str]) -> None:
        self.command = [
            sys.executable,
            "-m",
            "reward_server",
            "--port",
            "0",
            "--rewards",
            reward,
            "--log-level",
            "warning",
        ]
        if config is not None:
            self.command += ["--config", str(config)]
        self.command += list(extra_args)
        self.process: subprocess.Popen[str] | None = None
        self.address = ""

    def start(self, timeout: float = 60.0) -> str:
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        assert self.process.stdout is not None
        found: list[str] = []
        ready = threading.Event()

        def read_stdout() -> None:  # keeps draining stdout so that the server never blocks on it
            assert self.process is not None
            assert self.process.stdout is not None
            for line in self.process.stdout:
                match = _LISTENING.search(line)
                if match and not found:
                    found.append(f"{match.group(1)}:{match.group(2)}")
                    ready.set()
            ready.set()

        threading.Thread(target=read_stdout, name="server-stdout", daemon=True).start()
        if not ready.wait(timeout) or not found:
            self.stop()
            raise RuntimeError(f"the server did not announce its port within {timeout:g}s: {shlex.join(self.command)}")
        self.address = found[0]
        return self.address

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc; NaN when unknown."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14 and 15)


def git_revision() -> str:
    """The checked-out commit, with "+changes" when reward_server/ or clients/ differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "reward_server", "clients"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


# --- the paths --------------------------------------------------------------------------------------------------


def chunks(images: Sequence[Image], size: int) -> Iterator[Sequence[Image]]:
    for start in range(0, len(images), size):
        yield images[start : start + size]


class Paths:
    """One callable per path; each scores the whole batch and returns its scores in the order of the images."""

    def __init__(
        self, reward_name: str, images: list[Image], address: str | None, stream_chunk: int, wanted: Sequence[str]
    ) -> None:
        self.reward_name = reward_name
        self.images = images
        self.stream_chunk = stream_chunk
        self.reward = build_reward(reward_name)
        self.reward.load()
        self.client: RewardClient | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.aclient: AsyncRewardClient | None = None
        if address is not None and any(p != "inproc" for p in wanted):
            self.client = RewardClient(address)
            self.client.wait_ready(60, rewards=[reward_name])
            if any(p.endswith("-aio") for p in wanted):
                self.loop = asyncio.new_event_loop()
                self.aclient = self.loop.run_until_complete(self._open_aclient(address))

    async def _open_aclient(self, address: str) -> AsyncRewardClient:
        client = AsyncRewardClient(address)
        await client.wait_ready(60, rewards=[self.reward_name])
        return client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.loop is not None:
            if self.aclient is not None:
                self.loop.run_until_complete(self.aclient.close())
            self.loop.close()

    def get(self, path: str) -> Callable[[], npt.NDArray[np.float64]]:
        return {
            "inproc": self.inproc,
            "unary": self.unary,
            "stream": self.stream,
            "unary-aio": self.unary_aio,
            "stream-aio": self.stream_aio,
        }[path]

    def inproc(self) -> npt.NDArray[np.float64]:
        n = len(self.images)
        output = self.reward.score(self.images, [None] * n, [{}] * n)
        if output.errors is not None and any(e is not None for e in output.errors):
            raise RuntimeError(f"the reward failed in-process: {output.errors}")
        return np.asarray(output.scores, dtype=np.float64)

    def unary(self) -> npt.NDArray[np.float64]:
        assert self.client is not None
        return self.client.score(self.reward_name, self.images).scores

    def stream(self) -> npt.NDArray[np.float64]:
        assert self.client is not None
        scores = np.full(len(self.images), np.nan)
        with self.client.open_stream() as stream:
            for start, chunk in zip(
                range(0, len(self.images), self.stream_chunk), chunks(self.images, self.stream_chunk), strict=True
            ):
                stream.send(self.reward_name, chunk, ids=[str(start + i) for i in range(len(chunk))])
            stream.close()
            for result in stream.results():
                if not result.ok:
                    raise RuntimeError(f"stream item {result.id} failed: {result.code.name}: {result.message}")
                scores[int(result.id)] = result.score
        return scores

    def unary_aio(self) -> npt.NDArray[np.float64]:
        assert self.loop is not None
        assert self.aclient is not None
        client = self.aclient

        async def run() -> npt.NDArray[np.float64]:
            return (await client.score(self.reward_name, self.images)).scores

        return self.loop.run_until_complete(run())

    def stream_aio(self) -> npt.NDArray[np.float64]:
        assert self.loop is not None
        assert self.aclient is not None
        client = self.aclient

        async def run() -> npt.NDArray[np.float64]:
            scores = np.full(len(self.images), np.nan)
            async with client.open_stream() as stream:

                async def send_all() -> None:
                    for start, chunk in zip(
                        range(0, len(self.images), self.stream_chunk),
                        chunks(self.images, self.stream_chunk),
                        strict=True,
                    ):
                        await stream.send(self.reward_name, chunk, ids=[str(start + i) for i in range(len(chunk))])
                    await stream.close()

                sender = asyncio.create_task(send_all())
                async for result in stream.results():
                    if not result.ok:
                        raise RuntimeError(f"stream item {result.id} failed: {result.code.name}: {result.message}")
                    scores[int(result.id)] = result.score
                await sender
            return scores

        return self.loop.run_until_complete(run())


# --- the run ----------------------------------------------------------------------------------------------------


def measure(
    paths: Paths, names: Sequence[str], rounds: int, warmup: int, server_pid: int | None, log: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Warm up, then time ``rounds`` rounds of every path in a rotating order; check scores against inproc."""
    expected = paths.inproc()
    batch = len(paths.images)
    for name in names:  # warm-up doubles as the correctness check
        for _ in range(warmup):
            got = paths.get(name)()
            if not np.array_equal(got, expected):
                bad = np.flatnonzero(got != expected)[:5]
                raise AssertionError(
                    f"{name} scores differ from in-process scores at items {bad.tolist()}: "
                    f"{got[bad].tolist()} != {expected[bad].tolist()}"
                )
    samples: dict[str, list[float]] = {name: [] for name in names}
    client_cpu = dict.fromkeys(names, 0.0)
    server_cpu = dict.fromkeys(names, 0.0)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in [*names[shift:], *names[:shift]]:
            call = paths.get(name)
            cpu0, srv0 = own_cpu_s(), process_cpu_s(server_pid)
            start = time.perf_counter()
            got = call()
            elapsed = time.perf_counter() - start
            client_cpu[name] += own_cpu_s() - cpu0
            server_cpu[name] += process_cpu_s(server_pid) - srv0
            if not np.array_equal(got, expected):
                raise AssertionError(f"{name} scores differ from in-process scores in round {round_index}")
            samples[name].append(elapsed)
        log(
            f"round {round_index + 1}/{rounds}: "
            + "  ".join(f"{name} {batch / samples[name][-1]:.0f}/s" for name in names)
        )
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        rates = sorted(batch / s for s in samples[name])
        results[name] = {
            "images_per_s_median": statistics.median(rates),
            "images_per_s_min": rates[0],
            "images_per_s_max": rates[-1],
            "batch_ms_median": 1000 * statistics.median(samples[name]),
            "client_cpu_ms_per_image": 1000 * client_cpu[name] / (rounds * batch),
            "server_cpu_ms_per_image": (
                1000 * server_cpu[name] / (rounds * batch) if server_pid is not None and name != "inproc" else None
            ),
            "batch_s": samples[name],
        }
    base = results.get("inproc", {}).get("images_per_s_median")
    for name in names:
        results[name]["ratio_vs_inproc"] = results[name]["images_per_s_median"] / base if base else None
    return results


def format_table(results: dict[str, dict[str, Any]]) -> str:
    header = (
        f"{'path':<11} {'images/s':>9} {'(min-max)':>13} {'ms/batch':>9} {'ratio':>6}  "
        f"{'client CPU':>10} {'server CPU':>10}"
    )
    lines = [
        header,
        f"{'':<11} {'median':>9} {'':>13} {'median':>9} {'':>6}  {'ms/image':>10} {'ms/image':>10}",
        "-" * len(header),
    ]
    for name, r in results.items():
        ratio = f"{r['ratio_vs_inproc']:.2f}" if r["ratio_vs_inproc"] is not None else "-"
        server = f"{r['server_cpu_ms_per_image']:.2f}" if r["server_cpu_ms_per_image"] is not None else "-"
        span = f"{r['images_per_s_min']:.0f}-{r['images_per_s_max']:.0f}"
        lines.append(
            f"{name:<11} {r['images_per_s_median']:>9.0f} {span:>13} {r['batch_ms_median']:>9.1f} "
            f"{ratio:>6}  {r['client_cpu_ms_per_image']:>10.2f} {server:>10}"
        )
    return "\n".join(lines)


def write_config(args: argparse.Namespace) -> Path | None:
    """The --config file, or a temporary one from --max-batch-size/--max-queue-delay-ms/--instances."""
    settings = {
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_ms": args.max_queue_delay_ms,
        "instances": args.instances,
    }
    settings = {k: v for k, v in settings.items() if v is not None}
    if not settings:
        given: Path | None = args.config
        return given
    if args.config is not None:
        raise SystemExit("give either --config or --max-batch-size/--max-queue-delay-ms/--instances, not both")
    handle = tempfile.NamedTemporaryFile("w", prefix="bench-transport-", suffix=".toml", delete=False)  # noqa: SIM115
    with handle:
        handle.write(f"[rewards.{args.reward}]\n")
        for key, value in settings.items():
            handle.write(f"{key} = {value}\n")
    return Path(handle.name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", default="jpeg_compressibility", help="reward type (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="images per round (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="image height and width (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per path (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per path first (default: %(default)s)")
    parser.add_argument(
        "--paths",
        default=",".join(DEFAULT_PATHS),
        help=f"comma-separated, from {', '.join(PATHS)} (default: %(default)s)",
    )
    parser.add_argument("--stream-chunk", type=int, default=1, help="images per stream message (default: 1)")
    parser.add_argument("--server", help="HOST:PORT of a running server to use instead of starting one")
    parser.add_argument("--config", type=Path, help="server config file (TOML/YAML), passed as --config")
    parser.add_argument("--max-batch-size", type=int, help="server max_batch_size (written to a temporary config)")
    parser.add_argument("--max-queue-delay-ms", type=float, help="server max_queue_delay_ms (temporary config)")
    parser.add_argument("--instances", type=int, help="server instances (temporary config)")
    parser.add_argument("--server-args", default="", help="extra flags for `python -m reward_server`, one string")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE ('-': stdout)")
    parser.add_argument("--quiet", action="store_true", help="do not print every round")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(names) - set(PATHS))
    if unknown or not names:
        raise SystemExit(f"--paths: unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    if "inproc" not in names:
        names.insert(0, "inproc")  # the reference every ratio is taken against
    if args.batch < 1 or args.rounds < 1 or args.warmup < 0 or args.stream_chunk < 1:
        raise SystemExit("--batch, --rounds and --stream-chunk must be >= 1, --warmup >= 0")

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    started = time.perf_counter()
    images = make_images(args.batch, args.size)
    config = write_config(args)
    config_text = config.read_text() if config is not None else None
    server: ServerProcess | None = None
    address = args.server
    with contextlib.ExitStack() as stack:
        if config is not None and config != args.config:
            stack.callback(config.unlink)
        if address is None and names != ["inproc"]:
            server = ServerProcess(args.reward, config, shlex.split(args.server_args))
            stack.callback(server.stop)
            address = server.start()
            log(f"server: {shlex.join(server.command)}  (pid {server.pid}, {address})")
        paths = Paths(args.reward, images, address, args.stream_chunk, names)
        stack.callback(paths.close)
        results = measure(paths, names, args.rounds, args.warmup, server.pid if server else None, log)

    setup = {
        "reward": args.reward,
        "batch": args.batch,
        "image_shape": [args.size, args.size, 3],
        "rounds": args.rounds,
        "warmup": args.warmup,
        "stream_chunk": args.stream_chunk,
        "server": shlex.join(server.command) if server else args.server,
        "server_config": config_text,
        "commit": git_revision(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "elapsed_s": time.perf_counter() - started,
    }
    print(
        f"reward {args.reward}, batch {args.batch} x {args.size}x{args.size}x3 uint8, {args.rounds} rounds "
        f"(+{args.warmup} warm-up), stream chunk {args.stream_chunk}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    if server is not None:
        print(f"server: {shlex.join(server.command[1:])}")
    if setup["server_config"]:
        print("server config: " + "; ".join(line for line in setup["server_config"].splitlines() if line.strip()))
    print(f"commit: {setup['commit']}")
    print("scores: every service path equals in-process exactly")
    print(format_table(results))
    ratios = {n: r["ratio_vs_inproc"] for n, r in results.items() if n != "inproc"}
    print(
        f"ratio service / in-process (target >= {TARGET_RATIO:.1f}): "
        + ", ".join(f"{n} {v:.2f} ({'ok' if v >= TARGET_RATIO else 'below'})" for n, v in ratios.items())
    )
    if args.json:
        text = json.dumps({"setup": setup, "results": results}, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
