"""Test harness: real servers on loopback ports (in a thread or as a process) and small test rewards."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from reward_server.batching import BatchingConfig
from reward_server.config import ServerConfig
from reward_server.rewards import ImageSpec, ItemError, Metadata, Reward, RewardOutput, RewardSpec
from reward_server.rewards.aesthetic import HEAD_FILE
from reward_server.rewards.jpeg import JpegSize
from reward_server.server import RewardServer

ROOT = Path(__file__).resolve().parent.parent
# The real LAION aesthetic head (not committed): tests that need it skip when it is absent.
EXAMPLE_PLUGIN = ROOT / "docs" / "examples" / "custom-reward"  # the module ddpo_example_rewards
HEAD = ROOT.parent / "shared" / "assets" / "laion-aesthetic-v2" / HEAD_FILE
needs_head = pytest.mark.skipif(not HEAD.is_file(), reason=f"the real LAION aesthetic head is not at {HEAD}")


def plugin_env(*paths: Path) -> dict[str, str]:
    """This process's environment with ``paths`` (default: the example plugin's folder) first on PYTHONPATH."""
    folders = [str(p) for p in (paths or (EXAMPLE_PLUGIN,))]
    path = os.pathsep.join([*folders, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path}


def mean_pixel(images: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float64]:
    return np.array([float(image.mean()) for image in images])


class SlowReward(Reward):
    """Mean pixel value, after sleeping ``delay`` seconds per batch; records the size of every batch it scores."""

    def __init__(self, name: str = "slow", delay: float = 0.5) -> None:
        self.spec = RewardSpec(name=name, description="mean pixel, slowly", version="1", units="pixel")
        self.delay = delay
        self.batch_sizes: list[int] = []

    def score(
        self, images: Sequence[npt.NDArray[np.uint8]], prompts: Sequence[str | None], metadata: Sequence[Metadata]
    ) -> RewardOutput:
        time.sleep(self.delay)
        self.batch_sizes.append(len(images))
        return RewardOutput(scores=mean_pixel(images))


class DelayedJpeg(JpegSize):
    """jpeg_compressibility (deterministic) that sleeps ``delay_s`` per batch first, like a model reward that costs as
    much; with ``announce``, it prints "scoring N" to stdout as each batch of N starts (the fault tests count them)."""

    def __init__(self, delay_s: float, announce: bool = False) -> None:
        super().__init__("jpeg_compressibility", sign=-1)
        self.delay_s = delay_s
        self.announce = announce

    def score(
        self, images: Sequence[npt.NDArray[np.uint8]], prompts: Sequence[str | None], metadata: Sequence[Metadata]
    ) -> RewardOutput:
        if self.announce:
            print(f"scoring {len(images)}", flush=True)
        time.sleep(self.delay_s)
        return super().score(images, prompts, metadata)


class PromptLength(Reward):
    """Needs a prompt; the score is its length, with the prompt echoed in info and a component."""

    spec = RewardSpec(
        name="prompt_length",
        description="length of the prompt",
        version="1",
        units="chars",
        requires_prompt=True,
        image_spec=ImageSpec(channels=(1, 3, 4), max_size=(64, 64)),
        component_names=("words",),
    )

    def score(
        self, images: Sequence[npt.NDArray[np.uint8]], prompts: Sequence[str | None], metadata: Sequence[Metadata]
    ) -> RewardOutput:
        return RewardOutput(
            scores=np.array([float(len(p or "")) for p in prompts]),
            components={"words": np.array([float(len((p or "").split())) for p in prompts])},
            info=[{"prompt": p or "", "tag": str(m.get("tag", ""))} for p, m in zip(prompts, metadata, strict=True)],
        )


class BrokenReward(Reward):
    """Misbehaves according to ``mode``: raise, nan, wrong_shape, or item_error (for images whose mean is 0)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.spec = RewardSpec(name=f"broken_{mode}", description=f"broken: {mode}", version="1", units="")

    def score(
        self, images: Sequence[npt.NDArray[np.uint8]], prompts: Sequence[str | None], metadata: Sequence[Metadata]
    ) -> RewardOutput:
        scores = mean_pixel(images)
        if self.mode == "raise":
            raise RuntimeError("model exploded")
        if self.mode == "nan":
            return RewardOutput(scores=np.where(scores == 0, np.nan, scores))
        if self.mode == "wrong_shape":
            return RewardOutput(scores=scores[:-1])
        errors = [
            ItemError(grpc.StatusCode.FAILED_PRECONDITION, "all-black image cannot be judged") if s == 0 else None
            for s in scores
        ]
        return RewardOutput(scores=scores, errors=errors)


class RejectPrompt(Reward):
    """Mean pixel value, except an item error for every item whose prompt is ``rejected``."""

    def __init__(self, rejected: str) -> None:
        self.rejected = rejected
        self.spec = RewardSpec(name="reject_prompt", description=f"rejects {rejected!r}", version="1", units="pixel")

    def score(
        self, images: Sequence[npt.NDArray[np.uint8]], prompts: Sequence[str | None], metadata: Sequence[Metadata]
    ) -> RewardOutput:
        errors = [
            ItemError(grpc.StatusCode.FAILED_PRECONDITION, f"cannot judge {p!r}") if p == self.rejected else None
            for p in prompts
        ]
        return RewardOutput(scores=mean_pixel(images), errors=errors)


class ServerThread:
    """A real RewardServer on a free loopback port, running its own event loop in a background thread."""

    def __init__(
        self, rewards: Sequence[Reward | tuple[Reward, BatchingConfig]], wait_loaded: bool = True, **config: Any
    ) -> None:
        self._wait_loaded = wait_loaded
        self._rewards = [r if isinstance(r, tuple) else (r, BatchingConfig()) for r in rewards]
        self._config = ServerConfig(port=0, **config)
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.server: RewardServer | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.server = RewardServer(self._config, self._rewards)
            await self.server.start()
            if self._wait_loaded:  # rewards load in the background; most tests start once all have tried
                await self.server.wait_loaded()
            self._started.set()
            await self._stop.wait()
            await self.server.stop(grace=1.0)

        try:
            asyncio.run(main())
        except BaseException as error:  # surfaced by __enter__
            self._error = error
            self._started.set()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


class ServerProcess:
    """``python -m reward_server`` (or another module) as a separate process on a free loopback port."""

    def __init__(
        self,
        *args: str,
        module: str = "reward_server",
        command: Sequence[str] | None = None,
        wait_ready: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.command = [*(command or [sys.executable, "-m", module]), "--port", "0", *args]
        self.env = dict(env if env is not None else os.environ)
        self.wait_ready = wait_ready
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""
        self.metrics_url = ""
        self.stderr = ""

    def __enter__(self) -> ServerProcess:
        env = {**self.env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            self.command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("ddpo reward server listening on "):
                self.address = line.split()[5]
                break
        else:
            self.proc.wait(10)
            raise RuntimeError(f"server did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
        if "--metrics-port" in self.command:
            self.metrics_url = self.proc.stdout.readline().split()[2]
        if self.wait_ready:  # the server listens at once and loads its rewards in the background
            from clients import RewardClient

            with RewardClient(self.address) as client:
                client.wait_ready(timeout=120)
        return self

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, wait, and return the exit code (stderr is kept in ``self.stderr``)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.stderr = self.proc.communicate()
            raise
        return self.proc.returncode

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.terminate()


def free_port() -> int:
    """A port that was free a moment ago (for servers, like Triton, that cannot pick one themselves)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class TritonProcess:
    """A real Triton server as a process on free loopback ports: ``ddpo triton serve`` on a model repository, or
    another command (``ddpo serve --frontend pytriton``) given the ports. Its log goes to ``log_file``."""

    def __init__(
        self,
        log_file: Path,
        rewards: Sequence[str],
        *,
        repository: Path | None = None,
        command: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.env = dict(env if env is not None else os.environ)
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        ports = [f"--http-port={self.http_port}", f"--metrics-port={self.metrics_port}"]
        if repository is not None:
            command = [*DDPO, "triton", "serve", f"--model-repository={repository}", f"--grpc-port={self.grpc_port}"]
        else:
            ports.append(f"--port={self.grpc_port}")
        self.command = [*command, *ports]
        self.address = f"triton://127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log_file = log_file
        self.rewards = list(rewards)  # ready means these models are ready (PyTriton's server is ready before them)
        self.frontend = "tritonserver" if repository is not None else "pytriton"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TritonProcess:
        from clients import TritonRewardClient

        with self.log_file.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        try:
            with TritonRewardClient(self.address) as client:
                client.wait_ready(timeout=180, rewards=self.rewards)
        except BaseException:
            self.__exit__()
            raise RuntimeError(f"Triton did not start: {self.log_file.read_text()[-4000:]}") from None
        return self

    def kill(self) -> None:
        """SIGKILL the whole process group: `ddpo triton serve` runs tritonserver, which runs the backend stubs."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


DDPO = (sys.executable, "-m", "clients.cli")


def train_tiny(address: str, run_dir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`ddpo train --config tiny` against the reward service at ``address``, into ``run_dir``, as a process."""
    command = [*DDPO, "train", "--config", "tiny", "--reward-server", address, "--run-dir", str(run_dir), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


RUN = ["--epochs", "2", "sample.num_steps=5", "eval.enabled=false", "log.tensorboard=false", "log.images_every=0"]
"""The two-epoch tiny run that the fault and replica tests disturb, and compare with an undisturbed one."""
DELAY_S = 1.5  # the slow server's time per batch of 8: long enough to kill it while it scores one


def assert_same_lora(a: Path, b: Path) -> None:
    """The final LoRA of run folders ``a`` and ``b`` are equal bit for bit."""
    import torch
    from safetensors.torch import load_file

    first, second = (load_file(run / "final" / "pytorch_lora_weights.safetensors") for run in (a, b))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def start_trainer(address: str, run_dir: Path, *args: str) -> subprocess.Popen[str]:
    command = [*DDPO, "train", "--config", "tiny", "--reward-server", address, "--run-dir", str(run_dir), *RUN, *args]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class SlowServer:
    """tests/slow_server.py --jpeg on a fixed port: lives can be ended with SIGKILL and started again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.server: ServerProcess | None = None
        self.started_items = 0  # items whose scoring began in this life
        self._changed = threading.Condition()

    def start(self) -> None:
        self.server = ServerProcess(
            "--jpeg", "--delay", str(DELAY_S), "--port", str(self.port), module="tests.slow_server"
        )
        self.server.__enter__()
        self.started_items = 0
        threading.Thread(target=self._count, args=(self.server,), daemon=True).start()

    def _count(self, server: ServerProcess) -> None:
        assert server.proc is not None
        assert server.proc.stdout is not None
        for line in server.proc.stdout:
            if line.startswith("scoring "):
                with self._changed:
                    self.started_items += int(line.split()[1])
                    self._changed.notify_all()

    def wait_started(self, items: int, timeout: float = 120) -> None:
        """Until the scoring of the ``items``-th item of this life has begun."""
        with self._changed:
            assert self._changed.wait_for(lambda: self.started_items >= items, timeout), self.started_items

    def kill(self) -> None:
        assert self.server is not None
        assert self.server.proc is not None
        self.server.proc.kill()
        self.server.proc.wait()

    def stop(self) -> None:
        if self.server is not None:
            self.server.__exit__()
