"""Two real training processes on the CPU (gloo), under accelerate launch and torchrun, against real reward servers.

``accelerate launch --cpu --num_processes 2`` silently starts ONE process (accelerate's behaviour, see docs/gpu.md);
two CPU processes need ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.support import ROOT, RejectPrompt, ServerProcess, ServerThread, free_port, read_metrics
from trainer.prompts import PromptSampler

QUICK = ["log.tensorboard=false", "save_every=1", "eval.samples_per_prompt=1"]
TWO_CPU_PROCESSES = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def launch_command(launcher: str, address: str, run_dir: Path, *args: str) -> list[str]:
    """`ddpo train --config tiny` as two processes, with ``launcher`` (accelerate or torchrun)."""
    port = str(free_port())
    if launcher == "accelerate":
        start = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", port]
    else:
        start = ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    trainer = ["-m", "trainer", "--config", "tiny", "--reward-server", address, "--run-dir", str(run_dir), *args]
    return [sys.executable, "-m", *start, *trainer]


def launch(
    launcher: str, address: str, run_dir: Path, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    command = launch_command(launcher, address, run_dir, *args)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=TWO_CPU_PROCESSES)


def digests(checkpoint: Path) -> list[str]:
    """The sha256 of the trainable weights each process held when it saved ``checkpoint``."""
    found = []
    for process in range(2):
        with safe_open(checkpoint / f"rng_{process}.safetensors", "pt") as file:
            found.append(file.metadata()["weights_sha256"])
    return found


@pytest.fixture(scope="module")
def jpeg_server() -> ServerProcess:
    with ServerProcess("--rewards", "jpeg_compressibility") as server:
        yield server


@pytest.fixture(scope="module")
def two_epochs(jpeg_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("two-processes")
    done = launch("accelerate", jpeg_server.address, run_dir, "--epochs", "2", *QUICK)
    assert done.returncode == 0, done.stderr[-6000:]
    assert "(policy float32 on cpu, 2 process(es))" in done.stderr
    return run_dir


def test_two_processes_train_together(two_epochs: Path) -> None:
    metrics = read_metrics(two_epochs)
    assert [m["epoch"] for m in metrics] == [1, 2]  # written once, not once per process
    for line in metrics:
        assert line["processes"] == 2
        assert line["samples"] == 32  # 16 per process: the statistics count both
        assert line["global_step"] == 2 * line["epoch"]  # each process's 16 samples in minibatches of 8
        assert line["ratio_check"] == 0.0
    evals = [json.loads(line) for line in (two_epochs / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 2]  # the held-out evaluation ran once each time
    assert sorted(p.name for p in (two_epochs / "images").iterdir()) == [
        "epoch_000001.png",
        "epoch_000002.png",
        "eval_epoch_000000.png",
        "eval_epoch_000002.png",
    ]
    first, last = (digests(two_epochs / "checkpoints" / f"epoch_00000{n}") for n in (1, 2))
    assert first[0] == first[1]  # both processes hold the same weights after every epoch
    assert last[0] == last[1]
    assert first[0] != last[0]  # and training changed them
    assert (two_epochs / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_a_two_process_run_resumes_under_torchrun_bitwise(
    jpeg_server: ServerProcess, two_epochs: Path, tmp_path: Path
) -> None:
    first = launch("accelerate", jpeg_server.address, tmp_path, "--epochs", "1", *QUICK, "eval.enabled=false")
    assert first.returncode == 0, first.stderr[-6000:]
    resumed = launch("torchrun", jpeg_server.address, tmp_path, "--epochs", "2", "--resume", "latest", *QUICK)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert "resumed from" in resumed.stderr
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [1, 2]
    # every process continued its own prompts and noise: the weights equal the straight run's, bit for bit
    ours = load_file(tmp_path / "checkpoints" / "epoch_000002" / "model.safetensors")
    straight = load_file(two_epochs / "checkpoints" / "epoch_000002" / "model.safetensors")
    assert all(torch.equal(ours[key], straight[key]) for key in straight)
    assert digests(tmp_path / "checkpoints" / "epoch_000002") == digests(two_epochs / "checkpoints" / "epoch_000002")


def test_a_reward_error_on_one_process_stops_both(tmp_path: Path) -> None:
    prompts = [f"prompt {i}" for i in range(39)] + ["cat"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")

    def draws_a_cat(seed: int) -> bool:
        sampler = PromptSampler(prompts, seed)
        return any("cat" in sampler.sample(8) for _ in range(2))  # the first epoch's two sampling batches

    # a seed whose process 0 draws no 'cat' in the first epoch while process 1 (seed + 1) does
    seed = next(s for s in range(1000) if not draws_a_cat(s) and draws_a_cat(s + 1))
    with ServerThread([RejectPrompt("cat")]) as server:
        done = launch(
            "accelerate",
            server.address,
            tmp_path / "run",
            *("--reward", "reject_prompt", "--epochs", "2", f"seed={seed}", "eval.enabled=false"),
            *("prompts.set='from_file'", f"prompts.file='{tmp_path / 'prompts.txt'}'", "log.tensorboard=false"),
            timeout=300,  # a process left waiting at a collective would hang for gloo's 30-minute timeout
        )
    assert done.returncode != 0
    message = r"reward 'reject_prompt' failed for \d+ of 16 items; item \d+ \(prompt 'cat'\): FAILED_PRECONDITION"
    assert re.search(f"ddpo train: {message}", done.stderr)  # process 1, in its own words
    assert re.search(f"ddpo train: process 1 of 2 failed: RewardError: {message}", done.stderr)  # process 0
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no epoch was trained


def test_ctrl_c_stops_both_processes_at_a_safe_point_with_a_checkpoint(
    jpeg_server: ServerProcess, tmp_path: Path
) -> None:
    """A terminal's Ctrl-C reaches the launcher and both processes (one process group); the launcher forwards it."""
    command = launch_command(
        "accelerate", jpeg_server.address, tmp_path, "--epochs", "3", "eval.enabled=false", "log.tensorboard=false"
    )
    launched = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=TWO_CPU_PROCESSES,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.1)  # epoch 1 is done
        time.sleep(0.5)
        os.killpg(launched.pid, signal.SIGINT)
        _, stderr = launched.communicate(timeout=120)
    finally:
        launched.kill()
    assert launched.returncode == 130, stderr[-4000:]
    assert stderr.count("ddpo train: stopped by SIGINT") == 2  # each process, at the same safe point
    assert "Traceback" not in stderr
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch_000001"]
    first, second = digests(tmp_path / "checkpoints" / "epoch_000001")
    assert first == second
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [1]
