"""Several reward replicas: the trainer and the commands spread items over them by outstanding work, and a replica
that dies mid-epoch has its unanswered items re-sent to the others. Real server processes on loopback ports."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clients import open_client
from clients.replicas import PROBE_INTERVAL_S, expand_endpoints
from reward_server.batching import BatchingConfig
from tests.support import (
    DDPO,
    ROOT,
    ServerProcess,
    ServerThread,
    SlowReward,
    SlowServer,
    assert_same_lora,
    free_port,
    read_metrics,
    start_trainer,
)


def test_two_replicas_share_an_epoch_and_one_killed_mid_epoch_loses_nothing(undisturbed: Path, tmp_path: Path) -> None:
    first, second = SlowServer(free_port()), SlowServer(free_port())
    first.start()
    second.start()
    trainer = start_trainer(f"{first.address},{second.address}", tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)  # epoch 1 is done: everything it sent is answered
        before = first.started_items
        first.wait_started(before + 1)  # epoch 2's first batch (the least loaded lane: the first) is being scored
        first.kill()
        _, stderr = trainer.communicate(timeout=300)
    finally:
        trainer.kill()
        first.stop()
        second.stop()
    assert trainer.returncode == 0, stderr
    assert_same_lora(undisturbed, tmp_path)  # every item scored once: as against one server
    epochs = read_metrics(tmp_path)
    replicas = [epoch["reward_replicas"] for epoch in epochs]
    assert set(replicas[0]) == set(replicas[1]) == {first.address, second.address}
    assert replicas[0][first.address]["answered"] > 0  # both servers scored: the work was spread
    assert second.started_items > 0
    assert replicas[1][first.address]["resent"] == 8  # its batch of epoch 2 went to the other
    assert replicas[1][first.address]["answered"] == 0
    assert replicas[1][second.address]["answered"] == 16
    assert all(epoch["samples"] == 16 for epoch in epochs)
    assert replicas[1][second.address]["latency_s"] > 0


def test_a_slow_replica_gets_less() -> None:
    """Balancing by outstanding work: the replica that answers at once takes most of the batches."""
    slow, fast = SlowReward("r", delay=0.3), SlowReward("r", delay=0.0)
    batching = BatchingConfig(max_batch_size=4, instances=1)
    with (
        ServerThread([(slow, batching)]) as a,
        ServerThread([(fast, batching)]) as b,
        open_client(f"{a.address},{b.address}") as client,
        client.open_stream() as stream,
    ):
        images = np.zeros((4, 8, 8, 3), np.uint8)
        for _ in range(30):
            stream.send("r", images)
            time.sleep(0.01)
        stream.close()
        results = list(stream.results())
        shares = {address: stats.answered for address, stats in stream.stats.items()}
    assert len(results) == 120
    assert shares[b.address] > 2 * shares[a.address] > 0


def test_ddpo_score_and_eval_take_a_list_of_replicas_and_a_dns_name(tmp_path: Path) -> None:
    files = []
    for shade in range(4):
        path = tmp_path / f"{shade}.png"
        Image.fromarray(np.full((16, 16, 3), 60 * shade, np.uint8)).save(path)
        files.append(str(path))

    def score(server: str) -> list[float]:
        done = subprocess.run(
            [*DDPO, "score", "--server", server, "--reward", "jpeg_compressibility", "--json", *files],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return [json.loads(line)["score"] for line in done.stdout.splitlines()]

    with (
        ServerProcess("--rewards", "jpeg_compressibility") as a,
        ServerProcess("--rewards", "jpeg_compressibility") as b,
    ):
        single = score(a.address)
        assert score(f"{a.address},{b.address}") == single
        port = a.address.rsplit(":", 1)[1]
        assert score(f"dns:///localhost:{port}") == single  # localhost may also give ::1, where nothing listens
        assert [address for address, _ in expand_endpoints(f"dns:///localhost:{port}")] >= [f"127.0.0.1:{port}"]
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("two red circles\n")
        command = [*DDPO, "eval", "--model", "tiny", "--prompts", str(prompts), "--samples-per-prompt", "2"]
        command += [
            "--seed",
            "0",
            "--num-steps",
            "2",
            "--rewards",
            "jpeg_compressibility",
            "--out",
            str(tmp_path / "e"),
        ]
        evaluated = subprocess.run(
            [*command, "--reward-server", f"{a.address},{b.address}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert evaluated.returncode == 0, evaluated.stderr
    records = [json.loads(line) for line in (tmp_path / "e" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert all(np.isfinite(record["rewards"]["jpeg_compressibility"]) for record in records)


@pytest.mark.parametrize(
    ("server", "problem"),
    [("a:1,,b:2", "has an empty entry"), ("dns:///nowhere", "dns:///NAME:PORT"), ("a:1,b", "HOST:PORT")],
)
def test_malformed_replica_addresses_are_refused_with_the_expected_form(server: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        open_client(server)


def test_a_probe_that_outlives_its_replica_set_reports_instead_of_raising() -> None:
    """A stream that gave up (outage timeout) closes the set while its probe thread may still run: the probe says
    why, rather than printing a closed-channel traceback into the trainer's stop message (seen in CI)."""
    with ServerThread([(SlowReward("r", delay=0.0), BatchingConfig())]) as server:
        client = open_client(f"{server.address},{server.address}")
        assert client.probe("r") == {server.address: None}
        client.close()
        assert client.probe("r") == {server.address: "the replica set is closed"}


def test_a_replica_that_comes_back_is_used_again(tmp_path: Path) -> None:
    """A stream over two replicas: one is killed (its items go to the other), restarted on its port, and then takes
    batches again once a probe finds it serving."""
    jpeg = ("--rewards", "jpeg_compressibility")
    port = free_port()
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with ServerProcess(*jpeg) as steady:
        first = ServerProcess(*jpeg, "--port", str(port))
        first.__enter__()
        comeback = f"127.0.0.1:{port}"
        with open_client(f"{comeback},{steady.address}") as client, client.open_stream() as stream:
            answered: list[str] = []
            reader = threading.Thread(target=lambda: answered.extend(r.id for r in stream.results() if r.ok))
            reader.start()
            for _ in range(4):
                stream.send("jpeg_compressibility", images)
            time.sleep(1)
            assert first.proc is not None
            first.proc.kill()
            first.proc.wait()
            for _ in range(4):
                stream.send("jpeg_compressibility", images)
                time.sleep(0.2)
            before = stream.stats[comeback].sent
            with ServerProcess(*jpeg, "--port", str(port)):
                time.sleep(3 * PROBE_INTERVAL_S)  # a probe finds it serving and opens a lane to it
                for _ in range(8):
                    stream.send("jpeg_compressibility", images)
                    time.sleep(0.05)
                stream.close()
                reader.join(60)
                after = stream.stats[comeback].sent
    assert len(answered) == len(set(answered)) == 64  # nothing lost, nothing counted twice
    assert after > before  # it took batches again


def test_per_replica_figures_reach_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.tracking import RunLogger

    logger = RunLogger(tmp_path, {}, tensorboard=True, wandb=False, project="", start_epoch=0)
    replicas = {"10.0.0.5:50051": {"sent": 16, "answered": 8, "resent": 8, "latency_s": 0.25}}
    logger.log_epoch({"epoch": 1, "reward_mean": 1.0, "loss": 0.5, "train_s": 2.0, "reward_replicas": replicas})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"reward/replicas/10.0.0.5:50051/{key}" for key in ("sent", "answered", "resent", "latency_s")} <= tags
    assert events.Scalars("reward/replicas/10.0.0.5:50051/resent")[0].value == 8
    # sections: reward/, loss/, time/ (metrics.jsonl keeps the flat names)
    assert {"reward/mean", "loss/total", "time/train_s"} <= tags
    assert not tags & {"reward_mean", "loss", "train_s", "epoch"}
