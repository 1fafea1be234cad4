"""The trainer end to end on tiny SD-architecture pipelines, against real reward servers on loopback ports."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clients import RewardClient
from reward_server.rewards.jpeg import JpegSize
from tests.support import ROOT, RejectPrompt, ServerProcess, ServerThread, read_metrics, train_tiny
from trainer.config import load_config
from trainer.prompts import load_prompts
from trainer.rewards import RewardError, connect
from trainer.sampling import load_pipeline
from trainer.tiny import build_tiny_pipeline
from trainer.tracking import caption_text, image_grid, reward_curve
from trainer.train import Trainer
from trainer.update import RatioCheckError

METRIC_KEYS = {
    "epoch",
    "reward_mean",
    "reward_std",
    "approx_kl",
    "clipfrac",
    "loss",
    "ratio_check",
    "sample_s",
    "reward_wait_s",
    "train_s",
}
FAST = ["sample.num_steps=5", "log.tensorboard=false", "log.images_every=0", "eval.enabled=false"]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """A real RewardServer on a free loopback port: JPEG compressibility, and a reward that rejects prompt 'cat'."""
    with ServerThread([JpegSize("jpeg_compressibility", sign=-1), RejectPrompt("cat")]) as running:
        yield running


def run_tiny(
    run_dir: Path, address: str, *overrides: str, resume: str | None = None, overwrite: bool = False
) -> list[dict[str, Any]]:
    config = load_config("tiny", [f"run_dir='{run_dir}'", f"reward.server='{address}'", *overrides])
    Trainer(config, resume=resume, overwrite=overwrite).run()
    return read_metrics(run_dir)


@pytest.mark.slow
def test_ddpo_train_streams_rewards_from_a_reward_server_process(tmp_path: Path) -> None:
    with ServerProcess("--rewards", "jpeg_compressibility") as reward_server:
        done = train_tiny(
            reward_server.address,
            tmp_path,
            *("--epochs", "2", "save_every=1", "sample.num_batches_per_epoch=3", "eval.samples_per_prompt=1"),
            timeout=300,
        )
    assert done.returncode == 0, done.stderr
    assert "final weights in" in done.stdout
    metrics = read_metrics(tmp_path)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for line in metrics:
        assert set(line) >= METRIC_KEYS
        assert line["ratio_check"] == 0.0  # float32, same batch layout: recomputed log-probs are bit-identical
        assert line["samples"] == 24
        assert line["reward_mean"] < 0
    # scoring overlapped sampling: answers for early batches were in hand before the last batch was sampled
    assert max(line["rewards_ready_frac"] for line in metrics) > 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_000001", "epoch_000002"]
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "images" / "epoch_000002.png").is_file()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 2]  # before training and after the last epoch
    assert [e["samples"] for e in evals] == [18, 18]  # the 18 held-out shapes prompts, one image each
    assert (tmp_path / "reward_curve.png").is_file()
    assert (tmp_path / "eval_before_after.png").is_file()


def test_held_out_evaluation_uses_fixed_noise_and_the_services_scores(tmp_path: Path, server: ServerThread) -> None:
    fast = [f for f in FAST if not f.startswith("eval.")]
    runs = {}
    for seed in (1, 2):
        run_tiny(
            tmp_path / str(seed), server.address, *fast, "num_epochs=1", f"seed={seed}", "eval.samples_per_prompt=1"
        )
        runs[seed] = [json.loads(line) for line in (tmp_path / str(seed) / "eval.jsonl").read_text().splitlines()]
    before, after = runs[1]
    assert before["items"] == runs[2][0]["items"]  # other training seed, same held-out noise: same images, same scores
    assert before["items"] != after["items"]  # training changed the model
    assert before["per_prompt"].keys() == set(load_prompts("shapes_heldout"))
    # the recorded rewards are the service's scores of the recorded images
    with RewardClient(server.address) as client:
        images = [np.asarray(Image.open(tmp_path / "1" / item["image"])) for item in after["items"]]
        scored = client.score("jpeg_compressibility", images)
    assert [item.score for item in scored.items] == pytest.approx([item["reward"] for item in after["items"]])
    assert after["reward_mean"] == pytest.approx(np.mean([item["reward"] for item in after["items"]]))


def test_without_streaming_no_answer_arrives_before_sampling_ends(tmp_path: Path, server: ServerThread) -> None:
    metrics = run_tiny(tmp_path, server.address, *FAST, "num_epochs=1", "reward.stream=false")
    assert metrics[0]["rewards_ready_frac"] == 0.0
    assert metrics[0]["samples"] == 16
    again = run_tiny(tmp_path, server.address, *FAST, "num_epochs=1", overwrite=True)  # starts over, clean
    assert [m["epoch"] for m in again] == [1]


def test_two_epochs_equal_one_then_resume_then_one_bitwise(tmp_path: Path, server: ServerThread) -> None:
    straight = run_tiny(tmp_path / "straight", server.address, *FAST, "num_epochs=2", "save_every=1")
    run_tiny(tmp_path / "resumed", server.address, *FAST, "num_epochs=1", "save_every=1")
    resumed = run_tiny(tmp_path / "resumed", server.address, *FAST, "num_epochs=2", "save_every=1", resume="latest")
    assert [m["epoch"] for m in resumed] == [1, 2]
    assert resumed[1]["global_step"] == straight[1]["global_step"] == 4
    assert resumed[1]["reward_mean"] == straight[1]["reward_mean"]
    assert resumed[1]["prompts_tracked"] == straight[1]["prompts_tracked"]  # the stat tracker came back warm
    for name in ("model.safetensors", "optimizer.safetensors", "rng_0.safetensors"):
        a = load_file(tmp_path / "straight" / "checkpoints" / "epoch_000002" / name)
        b = load_file(tmp_path / "resumed" / "checkpoints" / "epoch_000002" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), name
    first = load_file(tmp_path / "straight" / "checkpoints" / "epoch_000001" / "model.safetensors")
    last = load_file(tmp_path / "straight" / "checkpoints" / "epoch_000002" / "model.safetensors")
    assert any(not torch.equal(first[key], last[key]) for key in first)  # training did change the adapter


def test_resume_errors_are_clear(tmp_path: Path, server: ServerThread) -> None:
    config = load_config("tiny", [f"run_dir='{tmp_path}'", f"reward.server='{server.address}'", *FAST])
    with pytest.raises(ValueError, match="no checkpoint in"):
        Trainer(config, resume="latest")
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        Trainer(config, resume=str(tmp_path))
    run_tiny(tmp_path / "lora", server.address, *FAST, "num_epochs=1")
    full = load_config(
        "tiny", [f"run_dir='{tmp_path}'", f"reward.server='{server.address}'", "lora.enabled=false", *FAST]
    )
    with pytest.raises(ValueError, match="does not match this model's trainable parameters"):
        Trainer(full, resume=str(tmp_path / "lora" / "checkpoints" / "epoch_000001"))


@pytest.fixture
def cat_and_dog(tmp_path: Path) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("cat\ndog\n")
    return f"prompts.file='{path}'"


def test_a_reward_error_fails_the_epoch_with_the_items_message(
    tmp_path: Path, server: ServerThread, cat_and_dog: str
) -> None:
    with pytest.raises(
        RewardError,
        match=r"reward 'reject_prompt' failed for \d+ of 16 items; item \d+ \(prompt 'cat'\): "
        r"FAILED_PRECONDITION: cannot judge 'cat'",
    ):
        run_tiny(tmp_path, server.address, *FAST, "reward.name='reject_prompt'", "prompts.set='from_file'", cat_and_dog)
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text()


def test_drop_leaves_failed_items_out_and_counts_them(tmp_path: Path, server: ServerThread, cat_and_dog: str) -> None:
    metrics = run_tiny(
        tmp_path,
        server.address,
        *FAST,
        "num_epochs=2",
        "reward.name='reject_prompt'",
        "reward.on_error='drop'",
        "prompts.set='from_file'",
        cat_and_dog,
        "train.batch_size=4",
    )
    for line in metrics:
        assert line["dropped"] > 0
        assert line["samples"] + line["dropped"] == 16
        assert np.isfinite(line["loss"])
        assert line["prompts_tracked"] == 1


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.algorithm='ddpo_sf'"],
        ["train.algorithm='rwr'", "train.rwr_beta=2.0"],
        ["train.algorithm='sparse_rwr'", "train.sparse_percentile=50.0"],
        ["train.algorithm='ddpo_is_kl'", "train.kl_coef=0.1"],
        ["train.algorithm='ddpo_is_kl'", "train.kl_estimator='logprob_sq'", "lora.enabled=false"],
        [
            "train.timestep_fraction=0.4",
            "train.num_inner_epochs=2",
            "sample.images_per_prompt=4",
            "stat_tracking.per_prompt=false",
        ],
    ],
    ids=["sf", "rwr", "sparse_rwr", "is_kl_lora", "is_kl_logprob_sq_full", "fraction_inner_groups"],
)
def test_every_algorithm_trains(tmp_path: Path, server: ServerThread, overrides: list[str]) -> None:
    (line,) = run_tiny(tmp_path, server.address, *FAST, "num_epochs=1", *overrides)
    assert np.isfinite(line["loss"])
    config = load_config("tiny", [*FAST, *overrides])
    assert line["global_step"] == config.optimizer_steps_per_epoch()
    assert set(line) >= METRIC_KEYS
    if "rwr" in " ".join(overrides):  # no importance ratio: null, not a made-up number
        assert line["ratio_check"] is line["approx_kl"] is line["clipfrac"] is None
    else:
        assert line["ratio_check"] == 0.0
    if "kl" in " ".join(overrides):
        assert line["kl"] >= 0
        assert np.isfinite(line["kl"])
        assert np.isfinite(line["policy_loss"])
    before = build_tiny_pipeline().unet.state_dict()
    weights = load_file(tmp_path / "checkpoints" / "epoch_000001" / "model.safetensors")
    if "lora.enabled=false" in overrides:
        assert any(not torch.equal(weights[k], before[k]) for k in weights)
    else:
        assert any("lora_B" in k and weights[k].abs().sum() > 0 for k in weights)  # B starts at 0


def test_the_ratio_check_stops_a_sampling_training_mismatch(tmp_path: Path, server: ServerThread) -> None:
    mismatch = "train.cfg=false"  # sampled with guidance, recomputed without
    with pytest.raises(RatioCheckError, match=r"max \|ratio − 1\| = .* > train.ratio_tolerance"):
        run_tiny(tmp_path / "fail", server.address, *FAST, "num_epochs=1", mismatch)
    (line,) = run_tiny(tmp_path / "warn", server.address, *FAST, "num_epochs=1", mismatch, "train.ratio_check='warn'")
    assert line["ratio_check"] > 1e-4


def test_exported_lora_loads_into_a_diffusers_pipeline_and_changes_it(tmp_path: Path, server: ServerThread) -> None:
    run_tiny(tmp_path, server.address, *FAST, "num_epochs=2", "train.learning_rate=1e-2")
    pipeline = build_tiny_pipeline()

    def sample() -> np.ndarray:
        out = pipeline(
            ["cat", "dog"], num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np"
        )
        return out.images

    before = sample()
    pipeline.load_lora_weights(tmp_path / "final")
    after = sample()
    assert before.shape == after.shape == (2, 64, 64, 3)
    assert np.abs(after - before).max() > 1e-3


def test_v_prediction_models_from_a_local_folder(tmp_path: Path, server: ServerThread) -> None:
    folder = tmp_path / "model"
    build_tiny_pipeline(prediction_type="v_prediction").save_pretrained(folder)
    pipeline = load_pipeline(str(folder))
    assert type(pipeline.scheduler).__name__ == "DDIMScheduler"
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    for algorithm in ("ddpo_is", "rwr"):
        (line,) = run_tiny(
            tmp_path / algorithm,
            server.address,
            *FAST,
            "num_epochs=1",
            f"model='{folder}'",
            f"train.algorithm='{algorithm}'",
        )
        assert np.isfinite(line["loss"])
        if algorithm == "ddpo_is":
            assert line["ratio_check"] == 0.0
    with pytest.raises(ValueError, match="neither an existing folder nor a hub id"):
        load_pipeline(str(tmp_path / "no" / "such" / "folder"))


def test_train_cli_errors(tmp_path: Path) -> None:
    def ddpo_train(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "trainer", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
        )

    bad_key = ddpo_train("--config", "tiny", "train.lr=1")
    assert bad_key.returncode == 2
    assert "unknown config key train.lr" in bad_key.stderr
    unreachable = ddpo_train(
        "--config", "tiny", "--reward-server", "127.0.0.1:1", "--run-dir", str(tmp_path), "reward.timeout=2"
    )
    assert unreachable.returncode == 1
    assert "ddpo train: cannot connect to the reward service at 127.0.0.1:1" in unreachable.stderr


def test_image_grid_keeps_every_reward_readable() -> None:
    images = np.zeros((6, 64, 64, 3), np.uint8)
    captions = [f"a hippopotamus washing the dishes {i} | -3.{i}1" for i in range(6)]
    grid = image_grid(images, captions, columns=4)
    assert grid.size == (4 * 128, 2 * (128 + 2 * 12))  # 64 px images enlarged to 128 px, two caption lines each
    assert caption_text("cat | -3.01", 21, 2) == ["cat | -3.01"]
    assert all("".join(caption_text(caption, 21, 2)).endswith(caption[-7:]) for caption in captions)  # "| -3.01"


def test_captions_keep_the_words_that_tell_prompts_apart() -> None:
    """Wrapped at spaces when they fit; else the middle goes, never the subject, the last words or the reward."""
    assert caption_text("two red triangles | 0.52", 21, 2) == ["two red triangles |", "0.52"]
    long = "two red triangles on a blue striped background | 0.52"
    lines = caption_text(long, 21, 2)
    assert len(lines) == 2
    assert all(len(line) <= 21 for line in lines)
    text = "".join(lines)
    assert text.startswith("two red triangles")
    assert text.endswith("background | 0.52")
    assert "…" in text
    (line,) = caption_text(long, 21, 1)
    assert line.startswith("two red")
    assert line.endswith("ground | 0.52")


def test_the_reward_curve_has_whole_epochs(tmp_path: Path) -> None:
    metrics = [{"epoch": e, "reward_mean": float(e), "reward_std": 0.1} for e in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    axes = reward_curve(tmp_path, "jpeg_compressibility").axes[0]
    low, high = axes.get_xlim()
    ticks = [tick for tick in axes.get_xticks() if low <= tick <= high]
    assert len(ticks) >= 2
    assert all(float(tick).is_integer() for tick in ticks)


@pytest.mark.slow
def test_main_job_serves_trains_evaluates_and_stops_the_server(tmp_path: Path) -> None:
    """scripts/demo.py, what `bash scripts/main.sh` runs after installing, for 2 epochs."""
    done = subprocess.run(
        [sys.executable, "scripts/demo.py", "--epochs", "2", "--run-dir", str(tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "held-out prompts, same noise before and after (36 images, jpeg_compressibility)" in done.stdout
    assert "server stopped with SIGTERM, exit code 0" in done.stdout
    assert "held-out changes over 2 epoch(s) are mostly noise: on the built-in tiny model, 30 epochs" in done.stderr
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    mean_line = next(line for line in done.stdout.splitlines() if line.startswith("mean "))
    assert f"{evals[0]['reward_mean']:.4f}" in mean_line
    assert f"{evals[-1]['reward_mean']:.4f}" in mean_line
    assert (tmp_path / "run" / "reward_curve.png").is_file()
    assert (tmp_path / "run" / "eval_before_after.png").is_file()


class FailsToLoad(JpegSize):
    def load(self) -> None:
        raise OSError("no weights at /models/reward")


def test_connect_names_a_missing_reward_or_the_reason_it_failed_to_load() -> None:
    with ServerThread([JpegSize("jpeg_compressibility", sign=-1), FailsToLoad("broken", sign=-1)]) as server:
        with pytest.raises(RewardError, match=r"reward 'nope' is not offered by .*; it offers: broken, jpeg_comp"):
            connect(server.address, "nope", None, None, timeout=10)
        started = time.monotonic()
        with pytest.raises(
            RewardError, match=r"reward 'broken' could not be loaded by .*: failed to load: OSError: no weights at"
        ):
            connect(server.address, "broken", None, None, timeout=60)
        assert time.monotonic() - started < 30  # at once, not after waiting for a health that never comes
        connect(server.address, "jpeg_compressibility", None, None, timeout=10).close()
