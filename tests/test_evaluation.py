"""Evaluation through the reward service: ``ddpo eval``, ``ddpo score --images`` and the trainer's held-out
evaluation, with their results.jsonl, summary.json and report.html, against a real reward-server process on a
loopback port; and the report rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from clients import RewardClient
from clients.evaluation import read_results
from tests.support import ROOT, RejectPrompt, ServerProcess, ServerThread, SlowReward
from trainer.config import load_config
from trainer.train import Trainer

DDPO = (sys.executable, "-m", "clients.cli")
REWARDS = ["jpeg_compressibility", "jpeg_incompressibility"]
PROMPTS = ["a red circle", "two blue squares"]
CHROMIUM = Path("/usr/bin/chromium")
OUTPUTS = ("results.jsonl", "summary.json", "report.html")
STATS = ("count", "failed", "mean", "std", "min", "q25", "median", "q75", "max")


def ddpo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DDPO, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def pixels(path: Path) -> npt.NDArray[np.uint8]:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run_eval(jpeg_server: ServerProcess, prompt_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``ddpo eval --model tiny`` on the two prompts, 2 samples each, seed 100, 10 steps: returns its output folder."""

    def run(*extra: str) -> Path:
        out = tmp_path_factory.mktemp("eval")
        done = ddpo(
            "eval",
            "--model=tiny",
            f"--prompts={prompt_file}",
            "--samples-per-prompt=2",
            "--seed=100",
            f"--rewards={','.join(REWARDS)}",
            f"--reward-server={jpeg_server.address}",
            f"--out={out}",
            *extra,
        )
        assert done.returncode == 0, done.stderr
        assert f"ddpo eval: wrote {len(read_results(out / 'results.jsonl'))} images" in done.stdout
        return out

    return run


@pytest.fixture(scope="module")
def base_eval(run_eval: Any) -> Path:
    out: Path = run_eval("--batch-size=4")
    return out


@pytest.fixture(scope="module")
def compared_eval(run_eval: Any, trained_run: Path) -> Path:
    """The run's final LoRA against the base model, with base_eval's settings."""
    out: Path = run_eval("--batch-size=4", f"--lora={trained_run / 'final'}", "--compare-lora=base")
    return out


@pytest.fixture(scope="module")
def trained_run(jpeg_server: ServerProcess, prompt_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small epochs of the tiny preset (one optimizer step each, large enough to change the images), with
    held-out evaluations of the two prompts (2 samples each) every epoch (eval.every=1): epochs 0, 1 and 2."""
    run_dir = tmp_path_factory.mktemp("run")
    overrides = [
        f"run_dir='{run_dir}'",
        f"reward.server='{jpeg_server.address}'",
        "num_epochs=2",
        "eval.every=1",
        "eval.set='from_file'",
        f"eval.file='{prompt_file}'",
        "eval.samples_per_prompt=2",
        "sample.num_steps=5",
        "sample.batch_size=4",
        "sample.num_batches_per_epoch=1",
        "train.batch_size=4",
        "train.learning_rate=3e-2",
        "log.tensorboard=false",
        "log.images_every=0",
    ]
    Trainer(load_config("tiny", overrides)).run()
    return run_dir


def expected_stats(values: list[float | None]) -> dict[str, Any]:
    scored = np.array([v for v in values if v is not None])
    q25, median, q75 = np.percentile(scored, [25, 50, 75])
    return {
        "count": len(scored),
        "failed": len(values) - len(scored),
        "mean": scored.mean(),
        "std": scored.std(),
        "min": scored.min(),
        "q25": q25,
        "median": median,
        "q75": q75,
        "max": scored.max(),
    }


def check_summary(out: Path, rewards: list[str]) -> list[dict[str, Any]]:
    """summary.json's statistics are numpy's over results.jsonl; returns the results."""
    results = read_results(out / "results.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    variants = list(dict.fromkeys(line["variant"] for line in results))
    assert summary["variants"] == variants
    assert summary["images"] == len(results)
    for reward in rewards:
        for variant in variants:
            values = [line["rewards"][reward] for line in results if line["variant"] == variant]
            got = summary["rewards"][reward][variant]
            assert list(got) == list(STATS)
            assert got == pytest.approx(expected_stats(values), rel=1e-12, abs=1e-12)
    for entry in summary["per_prompt"]:
        for reward in rewards:
            for variant in variants:
                values = [
                    line["rewards"][reward]
                    for line in results
                    if line["variant"] == variant and line["prompt_index"] == entry["prompt_index"]
                ]
                assert entry["mean"][reward][variant] == pytest.approx(np.mean(values), rel=1e-12)
    return results


def check_scores(out: Path, results: list[dict[str, Any]], address: str, rewards: list[str]) -> None:
    """Every recorded score equals the service's score of the saved image's pixels, sent as uint8 arrays."""
    scored = [line for line in results if not line.get("errors")]
    images = [pixels(out / line["image"]) for line in scored]
    with RewardClient(address) as client:
        for reward in rewards:
            direct = client.score(reward, images, prompts=[line["prompt"] for line in scored])
            assert [item.score for item in direct.items] == [line["rewards"][reward] for line in scored]


# ---------------------------------------------------------------------------------------------------- ddpo eval


@pytest.mark.slow
def test_ddpo_eval_writes_images_results_summary_and_report(base_eval: Path, jpeg_server: ServerProcess) -> None:
    assert all((base_eval / name).is_file() for name in OUTPUTS)
    results = check_summary(base_eval, REWARDS)
    assert [(r["variant"], r["prompt"], r["prompt_index"], r["sample"], r["seed"], r["image"]) for r in results] == [
        ("base", PROMPTS[p], p, k, 100 + 2 * p + k, f"images/base/{p:03d}_{k:02d}.png") for p in (0, 1) for k in (0, 1)
    ]
    for line in results:
        assert set(line["rewards"]) == set(REWARDS)
        assert "errors" not in line  # only failed rewards are listed
        assert pixels(base_eval / line["image"]).shape == (64, 64, 3)
    check_scores(base_eval, results, jpeg_server.address, REWARDS)
    settings = json.loads((base_eval / "summary.json").read_text())["settings"]
    assert settings["model"] == "tiny"
    assert settings["loras"] == {"base": None}
    assert (settings["seed"], settings["eta"], settings["samples_per_prompt"]) == (100, 1.0, 2)
    tiny = load_config("tiny").sample  # the tiny model's training defaults
    assert (settings["steps"], settings["guidance"]) == (tiny.num_steps, tiny.guidance_scale)
    assert settings["rewards"] == REWARDS
    assert settings["reward_server"] == jpeg_server.address
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", settings["created"])
    report = (base_eval / "report.html").read_text()
    assert report.count("<img ") == 4
    assert report.count("<svg ") == len(REWARDS)
    assert "http://" not in report.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained


@pytest.mark.slow
def test_eval_images_depend_only_on_their_seed(run_eval: Any, base_eval: Path) -> None:
    deterministic = [run_eval("--eta=0", "--batch-size=4") for _ in range(2)]
    one_by_one = run_eval("--batch-size=1")
    names = [f"images/base/{p:03d}_{k:02d}.png" for p in (0, 1) for k in (0, 1)]
    for name in names:
        # eta = 0 (deterministic DDIM): the same images, byte for byte, every time
        assert (deterministic[0] / name).read_bytes() == (deterministic[1] / name).read_bytes()
        # image i comes from seed 100 + i alone: sampled one by one or four at a time, it is the same image up to
        # float rounding in the batched UNet (a few pixels off by one level)
        batched, single = pixels(base_eval / name).astype(int), pixels(one_by_one / name).astype(int)
        assert np.abs(batched - single).max() <= 2
        assert (batched != single).mean() < 0.01
        assert np.abs(batched - pixels(deterministic[0] / name)).mean() > 1  # eta = 1 draws noise at every step
    different_seeds = pixels(base_eval / names[0]).astype(int) - pixels(base_eval / names[1])
    assert np.abs(different_seeds).mean() > 5  # the same prompt, another seed: another image


@pytest.mark.slow
def test_compare_lora_evaluates_both_variants_from_the_same_seeds(
    compared_eval: Path, base_eval: Path, trained_run: Path, jpeg_server: ServerProcess
) -> None:
    out = compared_eval
    results = check_summary(out, REWARDS)
    check_scores(out, results, jpeg_server.address, REWARDS)
    label = trained_run.name  # a run's final/ folder is named after the run
    assert [line["variant"] for line in results] == ["base"] * 4 + [label] * 4
    assert [line["seed"] for line in results] == [100, 101, 102, 103] * 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["loras"] == {
        "base": None,
        label: str(trained_run / "final" / "pytorch_lora_weights.safetensors"),
    }
    assert set(summary["rewards"]["jpeg_compressibility"]) == {"base", label}
    comparison = summary["comparison"]
    assert (comparison["reference"], comparison["candidate"]) == ("base", label)
    base_scores = [line["rewards"]["jpeg_compressibility"] for line in results[:4]]
    lora_scores = [line["rewards"]["jpeg_compressibility"] for line in results[4:]]
    differences = np.subtract(lora_scores, base_scores)
    assert comparison["rewards"]["jpeg_compressibility"]["mean_difference"] == pytest.approx(differences.mean())
    changed = 0
    for base_line, lora_line in zip(results[:4], results[4:], strict=True):
        base_image, lora_image = pixels(out / base_line["image"]), pixels(out / lora_line["image"])
        # the base variant is the plain model: the same images as an evaluation without any LoRA
        assert np.array_equal(base_image, pixels(base_eval / base_line["image"]))
        changed += not np.array_equal(base_image, lora_image)
    assert changed == 4  # the fine-tuned adapter changed every image
    report = (out / "report.html").read_text()
    assert report.count("<img ") == 8
    assert report.count("class='pair'") == 4  # base | fine-tuned, side by side per prompt and seed
    assert f"Each pair shows base | {label}" in report
    assert report.count("Δ jpeg_compressibility") == 4


def test_ddpo_eval_usage_and_service_errors(jpeg_server: ServerProcess, prompt_file: Path, tmp_path: Path) -> None:
    def evaluate(*args: str) -> subprocess.CompletedProcess[str]:
        base = {
            "--model": "tiny",
            "--prompts": str(prompt_file),
            "--samples-per-prompt": "1",
            "--seed": "0",
            "--rewards": "jpeg_compressibility",
            "--reward-server": jpeg_server.address,
            "--out": str(tmp_path / "out"),
        }
        for arg in args:
            key, _, value = arg.partition("=")
            base[key] = value
        return ddpo("eval", *(f"{k}={v}" for k, v in base.items()), timeout=120)

    cases = {
        "unknown set": (evaluate("--prompts=no_such_set"), 2, "--prompts 'no_such_set' is neither a prompt set"),
        "missing file": (evaluate(f"--prompts={tmp_path / 'nope.txt'}"), 2, "nor an existing file"),
        "missing lora": (evaluate(f"--lora={tmp_path / 'no_run' / 'final'}"), 2, "no_run/final' does not exist"),
        "empty lora folder": (evaluate(f"--lora={tmp_path}"), 2, "has no pytorch_lora_weights.safetensors"),
        "no samples": (evaluate("--samples-per-prompt=0"), 2, "--samples-per-prompt must be >= 1, got 0"),
        "no outage budget": (evaluate("--outage-timeout=0"), 2, "--outage-timeout must be > 0, got 0.0"),
        "bad reward list": (evaluate("--rewards=a,,b"), 2, "has an empty name"),
        "unknown reward": (
            evaluate("--rewards=jpeg_compressibility,aesthetic"),
            3,
            "reward 'aesthetic' is not offered by 127.0.0.1:",
        ),
    }
    for name, (done, code, message) in cases.items():
        assert done.returncode == code, (name, done.stderr)
        assert message in done.stderr, (name, done.stderr)
    assert "it offers: jpeg_compressibility, jpeg_incompressibility" in cases["unknown reward"][0].stderr
    assert not (tmp_path / "out").exists()  # nothing was sampled


# ------------------------------------------------------------------------------------------------- ddpo score --images


def _folder(base_eval: Path, folder: Path, names: list[str]) -> list[Path]:
    """The four images of ``base_eval`` under new names (a .jpg name is saved as a JPEG)."""
    folder.mkdir()
    paths = []
    for line, name in zip(read_results(base_eval / "results.jsonl"), names, strict=True):
        image = Image.open(base_eval / line["image"])
        if name.endswith((".jpg", ".jpeg")):
            image.save(folder / name, quality=90)
        else:
            image.save(folder / name)
        paths.append(folder / name)
    return paths


def test_score_images_with_each_prompt_source(base_eval: Path, jpeg_server: ServerProcess, tmp_path: Path) -> None:
    names = ["b.png", "a.jpg", "d.jpeg", "c.png"]
    metadata = _folder(base_eval, tmp_path / "metadata", names)
    lines = [
        {"file_name": "a.jpg", "prompt": "a red circle"},
        {"file_name": "b.png", "text": "a red circle"},  # ImageFolder's other caption column
        {"file_name": "c.png", "prompt": "two blue squares"},
        {"file_name": "d.jpeg", "prompt": "a <b>bold</b> prompt & more"},
        {"file_name": "unused.png", "prompt": "not in the folder"},
    ]
    (tmp_path / "metadata" / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    sidecar = _folder(base_eval, tmp_path / "sidecar", names)
    for path, prompt in zip(sidecar, ["one", "two", "one", "three"], strict=True):
        path.with_suffix(".txt").write_text(f"{prompt}\nsecond line is ignored\n")
    by_name = _folder(
        base_eval,
        tmp_path / "filename",
        ["a_red_circle_0.png", "a_red-circle_1.png", "two_blue_squares.png", "x_12_3.png"],
    )
    (tmp_path / "filename" / "notes.txt").write_text("not an image")  # neither an image nor a sidecar of one

    expected = {
        "metadata": (["a red circle", "a red circle", "two blue squares", "a <b>bold</b> prompt & more"], metadata),
        "sidecar": (["two", "one", "three", "one"], sidecar),
        "filename": (["a red circle", "a red circle", "two blue squares", "x 12"], by_name),
    }
    for source, (prompts, paths) in expected.items():
        out = tmp_path / f"out-{source}"
        folder = paths[0].parent
        done = ddpo(
            "score",
            "--images",
            str(folder),
            "--reward",
            ",".join(REWARDS),
            "--server",
            jpeg_server.address,
            "--out",
            str(out),
            *(["--prompts-from", "filename"] if source == "filename" else []),
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        files = sorted(paths)  # sorted by name
        results = check_summary(out, REWARDS)
        assert done.stdout.splitlines() == [
            f"{file}\t{reward}\t{line['rewards'][reward]:.6g}"
            for file, line in zip(files, results, strict=True)
            for reward in REWARDS
        ]
        assert [line["prompt"] for line in results] == prompts, source
        assert [line["variant"] for line in results] == ["images"] * 4
        assert all(line["seed"] is None for line in results)
        assert [(out / line["image"]).resolve() for line in results] == [p.resolve() for p in files]
        check_scores(out, results, jpeg_server.address, REWARDS)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["settings"]["prompts_from"] == source
    report = (tmp_path / "out-metadata" / "report.html").read_text()
    assert "a &lt;b&gt;bold&lt;/b&gt; prompt &amp; more" in report
    assert "<b>bold" not in report


def test_score_images_records_a_corrupt_file_and_usage_errors(
    base_eval: Path, jpeg_server: ServerProcess, tmp_path: Path
) -> None:
    folder = tmp_path / "images"
    paths = _folder(base_eval, folder, ["a.png", "b.png", "c.png", "d.png"])
    paths[1].write_bytes(paths[1].read_bytes()[:100])  # a truncated PNG

    def score(*args: str) -> subprocess.CompletedProcess[str]:
        return ddpo("score", "--server", jpeg_server.address, "--reward", ",".join(REWARDS), *args, timeout=60)

    done = score("--images", str(folder), "--out", str(tmp_path / "out"))
    assert done.returncode == 1
    results = check_summary(tmp_path / "out", REWARDS)
    assert [line["prompt"] for line in results] == [None] * 4  # no metadata.jsonl, no sidecars: no prompts
    broken = results[1]
    assert broken["rewards"] == {reward: None for reward in REWARDS}
    for reward in REWARDS:
        assert broken["errors"][reward].startswith("INVALID_ARGUMENT: ")
        assert "cannot decode PNG" in broken["errors"][reward]
        assert f"{paths[1]}\t{reward}\terror: INVALID_ARGUMENT: " in done.stdout
    check_scores(tmp_path / "out", results, jpeg_server.address, REWARDS)  # the other three were scored
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rewards"]["jpeg_compressibility"]["images"]["failed"] == 1
    assert (
        "<span class='err'>jpeg_compressibility: INVALID_ARGUMENT: " in (tmp_path / "out" / "report.html").read_text()
    )

    paths[0].with_suffix(".txt").write_text("a prompt for a.png only")
    cases = {
        "missing sidecar": (score("--images", str(folder), "--out", str(tmp_path / "o")), 2, "b.png has no sidecar"),
        "no --out": (score("--images", str(folder)), 2, "--images needs --out"),
        "both modes": (score("--images", str(folder), "--out", "o", str(paths[0])), 2, "not both"),
        "--out alone": (score("--out", "o", str(paths[0])), 2, "--out goes with --images"),
        "not a folder": (score("--images", str(paths[0]), "--out", "o"), 2, "is not a folder"),
        "no metadata": (
            score("--images", str(folder), "--out", "o", "--prompts-from", "metadata"),
            2,
            "metadata.jsonl does not exist",
        ),
        "unknown reward": (
            score("--images", str(folder), "--out", "o", "--prompts-from", "none", "--reward", "nope"),
            3,
            "it offers: jpeg_c",
        ),
    }
    for name, (result, code, message) in cases.items():
        assert result.returncode == code, (name, result.stderr)
        assert message in result.stderr, (name, result.stderr)


# ---------------------------------------------------------------------------------------------------- the trainer


@pytest.mark.slow
def test_the_trainers_held_out_evaluation_writes_the_same_outputs(trained_run: Path) -> None:
    evals = [json.loads(line) for line in (trained_run / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 1, 2]
    held_out = [prompt for prompt in PROMPTS for _ in range(2)]
    first_folder = trained_run / "eval" / "epoch_000000"
    before = read_results(first_folder / "results.jsonl")
    for evaluation in evals:
        epoch = evaluation["epoch"]
        folder = trained_run / "eval" / f"epoch_{epoch:06d}"
        assert all((folder / name).is_file() for name in OUTPUTS)
        lines = check_summary(folder, ["jpeg_compressibility"])
        # after epoch 0, the report compares with epoch 0 (its lines first), as `ddpo eval --compare-lora` does
        compared = lines[: len(held_out)] if epoch else []
        results = lines[len(compared) :]
        assert [line["prompt"] for line in results] == held_out
        assert [(line["prompt_index"], line["sample"]) for line in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert [line["seed"] for line in results] == [2023, 2024, 2025, 2026]  # eval.seed + image index
        assert {line["variant"] for line in results} == {f"epoch_{epoch}"}
        assert [(line["variant"], line["rewards"]) for line in compared] == [
            (line["variant"], line["rewards"]) for line in (before if epoch else [])
        ]
        for line, first in zip(compared, before, strict=False):
            assert (folder / line["image"]).resolve() == (
                trained_run / "eval" / "epoch_000000" / first["image"]
            ).resolve()
        # the same images and scores as eval.jsonl
        for line, item in zip(results, evaluation["items"], strict=True):
            assert (folder / line["image"]).resolve() == (trained_run / item["image"]).resolve()
            assert line["rewards"] == {"jpeg_compressibility": item["reward"]}
        summary = json.loads((folder / "summary.json").read_text())
        stats = summary["rewards"]["jpeg_compressibility"][f"epoch_{epoch}"]
        assert stats["mean"] == pytest.approx(evaluation["reward_mean"], rel=1e-12)
        assert stats["std"] == pytest.approx(evaluation["reward_std"], rel=1e-12)
        assert summary["settings"]["seed"] == 2023  # eval.seed
        assert summary["settings"]["epoch"] == epoch
        assert ("comparison" in summary) == (epoch > 0)
        if epoch:
            assert summary["comparison"]["reference"] == "epoch_0"
            assert summary["comparison"]["rewards"]["jpeg_compressibility"]["pairs"] == len(held_out)
        assert (folder / "report.html").read_text().count("<img ") == len(held_out) * (2 if epoch else 1)


@pytest.mark.slow
def test_ddpo_eval_and_the_held_out_evaluation_sample_the_same_images(run_eval: Any, trained_run: Path) -> None:
    """One noise scheme and one results schema: `ddpo eval` of the base model with the run's held-out settings
    (seed 2023, 5 steps) gives the images of the run's evaluation before training (its LoRA starts at zero)."""
    out = run_eval("--batch-size=4", "--seed=2023", "--num-steps=5")
    evaluated = read_results(out / "results.jsonl")
    before = trained_run / "eval" / "epoch_000000"
    trained = read_results(before / "results.jsonl")
    assert [set(line) for line in trained] == [set(line) for line in evaluated]
    key = [(line["prompt"], line["prompt_index"], line["sample"], line["seed"]) for line in trained]
    assert key == [(line["prompt"], line["prompt_index"], line["sample"], line["seed"]) for line in evaluated]
    for a, b in zip(trained, evaluated, strict=True):
        difference = np.abs(pixels(before / a["image"]).astype(int) - pixels(out / b["image"]).astype(int))
        assert difference.max() <= 1  # the same noise; a level for rounding in the LoRA's zero-valued branch
        assert a["rewards"]["jpeg_compressibility"] == pytest.approx(b["rewards"]["jpeg_compressibility"], abs=0.05)


# ---------------------------------------------------------------------------------------------------- Chromium


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.is_file():
        reason = f"{CHROMIUM} is missing: run scripts/setup_chromium.sh (as root) to install Debian's chromium"
        if os.environ.get("CI") == "true":  # CI installs it (scripts/test.sh): its absence there is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    return subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=10000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def loaded_counts(tmp_path: Path, report: Path) -> tuple[int, int, str]:
    """(images loaded, images failed, the visible status line) once the page's load event has run."""
    dom = chromium(tmp_path, "--dump-dom", report.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r'data-images-loaded="(\d+)"', dom.stdout)
    failed = re.search(r'data-images-failed="(\d+)"', dom.stdout)
    status = re.search(r'<p id="image-status">([^<]*)</p>', dom.stdout)
    assert loaded is not None, dom.stdout[:2000]
    assert failed is not None
    assert status is not None
    return int(loaded.group(1)), int(failed.group(1)), status.group(1)


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium_with_every_image(
    compared_eval: Path, base_eval: Path, tmp_path: Path
) -> None:
    compared = compared_eval
    assert loaded_counts(tmp_path, compared / "report.html") == (8, 0, "8 of 8 images loaded")
    screenshot = tmp_path / "report.png"
    shot = chromium(
        tmp_path, f"--screenshot={screenshot}", "--window-size=1280,2000", (compared / "report.html").as_uri()
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    page = np.asarray(Image.open(screenshot).convert("RGB"))
    assert page.shape == (2000, 1280, 3)
    assert page.std() > 20  # not blank: text, tables, histograms and images on white
    assert len(np.unique(page.reshape(-1, 3), axis=0)) > 500  # the sampled images' colours, not only text

    broken = tmp_path / "broken"
    shutil.copytree(base_eval, broken)
    (broken / "images" / "base" / "001_00.png").unlink()
    assert loaded_counts(tmp_path, broken / "report.html") == (3, 1, "3 of 4 images loaded (1 failed)")


def test_sample_and_score_saves_records_and_applies_the_run_policy(tmp_path: Path) -> None:
    """The one evaluation path of ddpo eval and the held-out evaluation, against a real server: each image saved at
    its path from its own generator, every reward's answer recorded, an item the service failed kept with its error
    (never a number), and a training run's on_error policy applied."""
    import torch

    from clients import open_client
    from clients.evaluation import write_evaluation
    from trainer.evaluate import sample_and_score, seeded_images
    from trainer.rewards import RewardError
    from trainer.sampling import SampleBatch

    def sample(batches: Any, what: str) -> Any:
        """Images of one grey level: the seed of the image's own generator."""
        for prompts, generators in batches:
            images = np.stack([np.full((8, 8, 3), g.initial_seed(), np.uint8) for g in generators])
            yield SampleBatch(prompts, *(torch.zeros(0),) * 4, images)

    prompts = ["a red circle", "a blue square"]
    with (
        ServerThread([RejectPrompt("a blue square"), SlowReward("slow", delay=0.0)]) as server,
        open_client(server.address) as client,
    ):

        def evaluate(on_error: str | None) -> tuple[list[Any], Exception | None]:
            return sample_and_score(
                seeded_images(len(prompts), 2, seed=7),
                prompts,
                sample,
                3,  # batches of 3 and 1
                client=client,
                rewards=["reject_prompt", "slow"],
                timeout=30,
                on_error=on_error,
                variant="epoch_3",
                out=tmp_path / str(on_error),
                image_path=lambda i, image: f"{image.prompt_index}/{i:03d}.png",
                what="the test",
            )

        records, error = evaluate(None)
        dropped, _ = evaluate("drop")
        with pytest.raises(RewardError, match=r"'reject_prompt' failed for 2 of 4 items; item 2 \(prompt 'a blue"):
            evaluate("fail")
    assert error is None
    assert [(r.variant, r.prompt, r.prompt_index, r.sample, r.seed, r.image) for r in records] == [
        ("epoch_3", "a red circle", 0, 0, 7, "0/000.png"),
        ("epoch_3", "a red circle", 0, 1, 8, "0/001.png"),
        ("epoch_3", "a blue square", 1, 0, 9, "1/002.png"),
        ("epoch_3", "a blue square", 1, 1, 10, "1/003.png"),
    ]
    assert [pixels(tmp_path / "None" / r.image).max() for r in records] == [7, 8, 9, 10]
    assert [r.rewards for r in records] == [
        {"reject_prompt": 7.0, "slow": 7.0},
        {"reject_prompt": 8.0, "slow": 8.0},
        {"reject_prompt": None, "slow": 9.0},
        {"reject_prompt": None, "slow": 10.0},
    ]
    assert records[2].errors == {"reject_prompt": "FAILED_PRECONDITION: cannot judge 'a blue square'"}
    assert [r.to_json() for r in dropped] == [r.to_json() for r in records]
    write_evaluation(tmp_path, records, ["reject_prompt", "slow"], {"epoch": 3})
    assert [line["rewards"] for line in read_results(tmp_path / "results.jsonl")] == [r.rewards for r in records]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rewards"]["reject_prompt"]["epoch_3"]["failed"] == 2
    assert summary["rewards"]["slow"]["epoch_3"]["failed"] == 0
