"""`ddpo train` and `ddpo eval` against reward servers that die, restart, stay away or are absent, and against
Ctrl-C; secrets kept out of every file. Real processes throughout: `ddpo serve` (or tests/slow_server.py), `ddpo train`
and `ddpo eval`.

JPEG rewards are deterministic, so a run that lost or double-counted an item would end with other weights than an
undisturbed run with the same seed: several tests compare the final LoRA bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from clients import RewardClient, RewardServiceError
from clients.admin import AdminClient
from clients.evaluation import read_results
from tests.support import (
    DDPO,
    ROOT,
    RUN,
    ServerProcess,
    SlowServer,
    assert_same_lora,
    free_port,
    read_metrics,
    start_trainer,
    train_tiny,
)


@pytest.fixture(scope="module")
def jpeg_server() -> Iterator[ServerProcess]:
    with ServerProcess("--rewards", "jpeg_compressibility") as server:
        yield server


def resume_command(stderr: str) -> list[str]:
    """The command the trainer printed to continue the run, runnable here."""
    lines = stderr.splitlines()
    printed = lines[lines.index(next(line for line in lines if line.endswith("continue with:"))) + 1]
    command = shlex.split(printed)
    assert command[:2] == ["ddpo", "train"]
    assert command[-2:] == ["--resume", "latest"]
    return [*DDPO, *command[1:]]


def test_a_server_killed_mid_epoch_and_restarted_loses_and_doubles_nothing(undisturbed: Path, tmp_path: Path) -> None:
    server = SlowServer(free_port())
    server.start()
    trainer = start_trainer(server.address, tmp_path)
    try:
        server.wait_started(8)  # epoch 1's first batch is being scored: no answer yet on this stream
        server.kill()
        time.sleep(3)
        server.start()  # it gets epoch 1's 16 items again, then epoch 2's
        server.wait_started(32)  # epoch 2's second batch began: its first batch has been answered
        time.sleep(0.5)
        server.kill()
        time.sleep(3)
        server.start()
        _, stderr = trainer.communicate(timeout=300)
    finally:
        trainer.kill()
        server.stop()
    assert trainer.returncode == 0, stderr
    assert_same_lora(undisturbed, tmp_path)  # every item scored once, none lost
    first, second = read_metrics(tmp_path)
    assert first["reward_resent"] >= 8
    assert second["reward_resent"] == 8  # the answers in hand were kept: only the second batch went again
    (replica,) = second["reward_replicas"].values()
    assert replica["sent"] == 16 + 8  # 8 of them twice
    assert replica["answered"] == 16
    assert first["samples"] == second["samples"] == 16


def test_a_server_gone_for_good_stops_the_run_which_resumes_later(undisturbed: Path, tmp_path: Path) -> None:
    server = SlowServer(free_port())
    server.start()
    trainer = start_trainer(server.address, tmp_path, "reward.outage_timeout=5")
    try:
        server.wait_started(24)  # epoch 2's first batch is being scored
        server.kill()
        _, stderr = trainer.communicate(timeout=120)  # the budget is 5 s: it must not wait much longer
    finally:
        trainer.kill()
        server.stop()
    assert trainer.returncode == 1
    assert "has answered since" in stderr
    assert "(5s, outage_timeout; probed every 2s); the last error: " in stderr
    assert "Connection refused" in stderr
    assert "reward.outage_timeout says how long to wait" in stderr
    # the finished epoch was checkpointed (tiny saves every 10 epochs otherwise)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch_000001"]
    command = resume_command(stderr)
    with ServerProcess("--rewards", "jpeg_compressibility", "--port", str(server.port)):
        resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [1, 2]
    assert_same_lora(undisturbed, tmp_path)


def start_eval(address: str, out: Path, *args: str) -> subprocess.Popen[str]:
    """`ddpo eval` of the tiny base model: 2 prompts × 4 samples in batches of 2, scored with jpeg_compressibility."""
    prompts = out.parent / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    command = [*DDPO, "eval", "--model=tiny", f"--prompts={prompts}", "--samples-per-prompt=4", "--seed=0"]
    command += ["--num-steps=4", "--batch-size=2", "--rewards=jpeg_compressibility", f"--reward-server={address}"]
    command += [f"--out={out}", *args]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_eval_through_a_server_restart_loses_and_doubles_nothing(tmp_path: Path) -> None:
    server = SlowServer(free_port())
    server.start()
    evaluation = start_eval(server.address, tmp_path / "out")
    try:
        server.wait_started(2)  # the first batch is being scored: no answer yet
        server.kill()
        time.sleep(3)
        server.start()
        stdout, stderr = evaluation.communicate(timeout=300)
        assert evaluation.returncode == 0, stderr
        results = read_results(tmp_path / "out" / "results.jsonl")
        assert len({line["image"] for line in results}) == len(results) == 8  # each image once
        assert server.started_items == 8  # the restarted server scored every image again, and nothing twice
        with RewardClient(server.address) as client:  # every score is that of the saved image
            saved = [np.asarray(Image.open(tmp_path / "out" / line["image"]).convert("RGB")) for line in results]
            direct = client.score("jpeg_compressibility", saved)
    finally:
        evaluation.kill()
        server.stop()
    assert [line["rewards"]["jpeg_compressibility"] for line in results] == [item.score for item in direct.items]
    assert "(8 scored, 0 failed)" in stdout


def test_eval_with_a_server_gone_for_good_records_what_it_could_not_score(tmp_path: Path) -> None:
    server = SlowServer(free_port())
    server.start()
    evaluation = start_eval(server.address, tmp_path / "out", "--outage-timeout=3")
    try:
        server.wait_started(3)  # the second server batch began: the first batch of 2 has been answered
        time.sleep(0.5)
        server.kill()
        stdout, stderr = evaluation.communicate(timeout=120)  # the budget is 3 s: it must not wait much longer
    finally:
        evaluation.kill()
        server.stop()
    assert evaluation.returncode == 3, stderr
    results = read_results(tmp_path / "out" / "results.jsonl")
    assert len(results) == 8
    assert all((tmp_path / "out" / line["image"]).is_file() for line in results)  # every image was still saved
    scores = [line["rewards"]["jpeg_compressibility"] for line in results]
    assert all(score is not None for score in scores[:2])
    assert scores[2:] == [None] * 6
    unavailable = f"UNAVAILABLE: no reward server of {server.address} has answered since "
    assert all(line["errors"]["jpeg_compressibility"].startswith(unavailable) for line in results[2:])
    assert "(3s, outage_timeout; probed every 2s)" in results[2]["errors"]["jpeg_compressibility"]
    assert "jpeg_compressibility\tbase\t" in stdout
    assert "(2 scored, 6 failed)" in stdout
    failed = f"ddpo eval: the reward service failed: ScoreStream: UNAVAILABLE: no reward server of {server.address} "
    assert failed in stderr
    assert "Traceback" not in stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rewards"]["jpeg_compressibility"]["base"]["failed"] == 6


def test_eval_stops_on_ctrl_c_mid_run_without_a_traceback(tmp_path: Path) -> None:
    server = SlowServer(free_port())
    server.start()
    evaluation = start_eval(server.address, tmp_path / "out")
    try:
        server.wait_started(2)  # sampling and scoring are both under way
        evaluation.send_signal(signal.SIGINT)
        _, stderr = evaluation.communicate(timeout=60)  # no stream or thread keeps it alive
    finally:
        evaluation.kill()
        server.stop()
    assert evaluation.returncode == 130, stderr
    assert stderr.rstrip().endswith("ddpo eval: interrupted (Ctrl-C)")
    assert "Traceback" not in stderr


def test_slow_sampling_never_times_out_the_rewards(jpeg_server: ServerProcess, tmp_path: Path) -> None:
    done = train_tiny(jpeg_server.address, tmp_path, *RUN, "--epochs", "1", "reward.timeout=0.5")
    assert done.returncode == 0, done.stderr
    (line,) = read_metrics(tmp_path)
    assert line["sample_s"] > 0.5  # the epoch's sampling outlasted the progress timeout
    assert line["reward_resent"] == 0


def test_sigint_mid_epoch_checkpoints_and_the_printed_command_resumes(
    jpeg_server: ServerProcess, undisturbed: Path, tmp_path: Path
) -> None:
    trainer = start_trainer(jpeg_server.address, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.1)  # epoch 1 is done when its line is written
        time.sleep(0.3)
        trainer.send_signal(signal.SIGINT)
        _, stderr = trainer.communicate(timeout=120)
    finally:
        trainer.kill()
    assert trainer.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "SIGINT: stopping after the current step" in stderr
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch_000001"]
    resumed = subprocess.run(resume_command(stderr), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_lora(undisturbed, tmp_path)  # as if it had never stopped


def test_a_used_run_folder_is_refused_and_left_unchanged(jpeg_server: ServerProcess, undisturbed: Path) -> None:
    def fingerprint() -> dict[Path, str]:
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in undisturbed.rglob("*") if p.is_file()}

    before = fingerprint()
    done = train_tiny(jpeg_server.address, undisturbed, *RUN)
    assert done.returncode == 2
    assert f"{undisturbed} already holds a run (metrics.jsonl" in done.stderr
    assert "--resume latest" in done.stderr
    assert "--overwrite" in done.stderr
    assert fingerprint() == before


def test_no_server_fails_at_once_before_the_model_loads(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = train_tiny(address, tmp_path / "run", *RUN, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    assert f"ddpo train: cannot connect to the reward service at {address} (" in done.stderr
    assert "Connection refused" in done.stderr
    assert "start one with `ddpo serve --rewards jpeg_compressibility`" in done.stderr
    assert "Loading pipeline components" not in done.stderr  # the model never loaded
    assert not (tmp_path / "run").exists()
    assert elapsed < 10


def test_tokens_never_reach_a_file(tmp_path: Path) -> None:
    token, admin_token = "reward-token-7f3a9c1e55d2", "admin-token-b81d04e6aa37"
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "admin").write_text(admin_token + "\n")
    endpoints = tmp_path / "endpoints.json"
    server_args = ["--rewards", "jpeg_compressibility", "--endpoints-file", str(endpoints), "--log-format", "json"]
    server_args += ["--auth-token-file", str(tmp_path / "token"), "--admin-token-file", str(tmp_path / "admin")]
    run_dir = tmp_path / "run"
    server = ServerProcess(*server_args)
    with server:
        with AdminClient(server.address, admin_token=admin_token) as admin:  # credentials of a remote endpoint
            admin.register_endpoint(
                "forwarded",
                f"grpc://{server.address}/jpeg_compressibility",
                {"auth_token_file": str(tmp_path / "token")},
            )
            with pytest.raises(RewardServiceError, match="carries credentials") as raised:
                admin.register_endpoint("leaky", f"http://user:{token}@127.0.0.1:1/score")
            assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert token not in raised.value.message
        with RewardClient(server.address) as anonymous, pytest.raises(RewardServiceError) as refused:
            anonymous.list_rewards()
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED  # the trainer below did need the token
        done = train_tiny(
            server.address,
            run_dir,
            *("--epochs", "1", "--auth-token-file", str(tmp_path / "token"), "--reward", "forwarded"),
            *("eval.samples_per_prompt=1", "log.wandb=false"),
        )
        assert done.returncode == 0, done.stderr
    assert json.loads(endpoints.read_text())  # the registration was saved
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"training_config.json", "state.json", "report.html", "summary.json", "metrics.jsonl"} <= {
        p.name for p in files
    }
    assert any(p.name.startswith("events.out.tfevents") for p in files)
    texts = {str(p): p.read_bytes() for p in [*files, endpoints]}
    texts |= {"server log": server.stderr.encode(), "trainer log": (done.stdout + done.stderr).encode()}
    for secret in (token, admin_token):
        leaks = [name for name, data in texts.items() if secret.encode() in data]
        assert not leaks, f"{secret} found in {leaks}"
