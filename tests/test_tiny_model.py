"""The built-in tiny model: committed weights that load like Stable Diffusion, follow their captions, and the script
that made them."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import numpy.typing as npt
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from tests.support import ROOT
from trainer.prompts import load_prompts
from trainer.sampling import load_pipeline
from trainer.tiny import TINY_MODEL_PATH, learn_merges, tiny_tokenizer

SCRIPT = ROOT / "scripts" / "pretrain_tiny.py"


@pytest.fixture(scope="module")
def pipeline() -> StableDiffusionPipeline:
    loaded = StableDiffusionPipeline.from_pretrained(TINY_MODEL_PATH)
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pretrain_tiny", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate(pipeline: StableDiffusionPipeline, prompts: list[str], seed: int, steps: int = 20) -> npt.NDArray:
    generator = torch.Generator().manual_seed(seed)
    out = pipeline(prompts, num_inference_steps=steps, guidance_scale=5.0, generator=generator, output_type="np")
    images: npt.NDArray[np.float32] = out.images
    return images


def test_loads_with_from_pretrained_like_stable_diffusion(pipeline: StableDiffusionPipeline) -> None:
    assert isinstance(pipeline.unet, UNet2DConditionModel)
    assert isinstance(pipeline.vae, AutoencoderKL)
    assert isinstance(pipeline.text_encoder, CLIPTextModel)
    assert isinstance(pipeline.tokenizer, CLIPTokenizer)
    assert isinstance(pipeline.scheduler, DDIMScheduler)
    assert pipeline.scheduler.config.steps_offset == 1
    assert not pipeline.scheduler.config.set_alpha_to_one
    assert pipeline.vae_scale_factor == 4
    assert pipeline.unet.config.sample_size == 16
    assert {p.dtype for p in pipeline.unet.parameters()} == {torch.float32}
    images = generate(pipeline, ["a red circle", "two blue squares"], seed=0, steps=4)
    assert images.shape == (2, 64, 64, 3)
    assert images.dtype == np.float32
    assert images.min() >= 0
    assert images.max() <= 1


def test_same_seed_same_images_other_seed_other_images(pipeline: StableDiffusionPipeline) -> None:
    first = generate(pipeline, ["a green triangle"], seed=7, steps=5)
    np.testing.assert_array_equal(first, generate(pipeline, ["a green triangle"], seed=7, steps=5))
    assert np.abs(first - generate(pipeline, ["a green triangle"], seed=8, steps=5)).mean() > 0.01


def test_the_trainer_loads_the_same_weights() -> None:
    trainer_pipeline = load_pipeline("tiny")
    reference = UNet2DConditionModel.from_pretrained(TINY_MODEL_PATH / "unet").state_dict()
    assert all(torch.equal(value, trainer_pipeline.unet.state_dict()[key]) for key, value in reference.items())


def test_samples_follow_the_colours_and_textures_in_their_captions(pipeline: StableDiffusionPipeline) -> None:
    """Same noise, different captions: the shape's colour and the background's texture follow the words."""

    def dominant(images: npt.NDArray, channel: int) -> float:  # share of pixels clearly of that primary colour
        others = [images[..., c] for c in range(3) if c != channel]
        mask = (images[..., channel] > others[0] + 0.2) & (images[..., channel] > others[1] + 0.2)
        return float(mask.mean())

    red, blue = (
        generate(pipeline, ["a large red circle"] * 4, seed=0),
        generate(pipeline, ["a large blue circle"] * 4, seed=0),
    )
    assert dominant(red, 0) > max(0.05, 5 * dominant(blue, 0))
    assert dominant(blue, 2) > max(0.05, 5 * dominant(red, 2))

    def detail(texture: str) -> float:  # mean absolute difference between neighbouring pixels
        images = generate(pipeline, [f"a red circle on a {texture} yellow background"] * 4, seed=0)
        return float(np.abs(np.diff(images, axis=1)).mean() + np.abs(np.diff(images, axis=2)).mean())

    plain = detail("plain")
    assert all(detail(texture) > 2 * plain for texture in ("striped", "checkered", "dotted", "noisy"))


def test_committed_weights_are_small_and_their_provenance_is_recorded(script: ModuleType) -> None:
    weights = sorted(TINY_MODEL_PATH.rglob("*.safetensors"))
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert sum(p.stat().st_size for p in weights) <= 10 * 1024 * 1024
    provenance = json.loads((TINY_MODEL_PATH / "provenance.json").read_text())
    assert provenance["script"] == "scripts/pretrain_tiny.py"
    assert provenance["seed"] == 0
    assert provenance["diffusion"]["steps"] >= 1000
    assert provenance["wall_time_s"]["total"] > 0
    # the committed weights came from the committed script
    assert provenance["script_sha256"] == hashlib.sha256(SCRIPT.read_bytes()).hexdigest()


def test_caption_words_are_single_tokens(pipeline: StableDiffusionPipeline, script: ModuleType) -> None:
    tokenizer = pipeline.tokenizer
    for word in script.WORDS:
        assert tokenizer.tokenize(word) == [f"{word}</w>"], word
    assert tokenizer.tokenize("a zebra")[0] == "a</w>"  # unknown words fall back to pieces, never fail
    assert len(tokenizer("three small purple triangles on a checkered orange background").input_ids) == 11


def test_learned_merges_reproduce_each_word() -> None:
    words = ["red", "reed", "green", "greener", "re"]
    tokenizer = tiny_tokenizer(words)
    assert [tokenizer.tokenize(word) for word in words] == [[f"{word}</w>"] for word in words]
    assert learn_merges([]) == []


def test_prompt_sets_hold_out_colour_shape_pairs(script: ModuleType) -> None:
    train, held_out = load_prompts("shapes"), load_prompts("shapes_heldout")
    assert (len(train), len(held_out)) == (54, 18)
    assert not set(train) & set(held_out)

    def pairs(prompts: list[str]) -> set[tuple[str, str]]:  # "two red circles" -> ("red", "circle")
        return {(prompt.split()[1], prompt.split()[2].removesuffix("s")) for prompt in prompts}

    assert len(pairs(held_out)) == 6
    assert not pairs(train) & pairs(held_out)
    assert script.prompt_sets() == {"shapes": train, "shapes_heldout": held_out}  # the committed files are in sync


def test_captions_name_what_is_drawn(script: ModuleType) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        image, caption = script.draw_scene(rng)
        assert image.size == (64, 64)
        words = caption.split()
        assert not words or (words[0] in ("a", "an", "two", "three") and set(words) <= set(script.WORDS) | {"a"})


@pytest.mark.slow
def test_pretraining_script_runs_and_its_output_loads(tmp_path: Path) -> None:
    out, prompts, grid = tmp_path / "model", tmp_path / "prompts", tmp_path / "grid.png"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--out",
            str(out),
            "--prompts-dir",
            str(prompts),
            "--grid",
            str(grid),
            "--vae-steps",
            "2",
            "--unet-steps",
            "3",
            "--batch-size",
            "2",
            "--vae-batch-size",
            "2",
            "--grid-steps",
            "2",
            "--threads",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    provenance = json.loads((out / "provenance.json").read_text())
    assert (provenance["vae"]["steps"], provenance["diffusion"]["steps"], provenance["seed"]) == (2, 3, 0)
    loaded = StableDiffusionPipeline.from_pretrained(out)
    assert loaded.vae.config.scaling_factor != 1.0  # set from the latents' spread
    committed = UNet2DConditionModel.load_config(TINY_MODEL_PATH / "unet")
    assert {k: v for k, v in loaded.unet.config.items() if not k.startswith("_")} == {
        k: v for k, v in committed.items() if not k.startswith("_")
    }
    assert (prompts / "shapes_heldout.txt").read_text().splitlines() == load_prompts("shapes_heldout")
    assert grid.is_file()


def test_pretraining_script_rejects_bad_flags() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--unet-steps", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "--unet-steps must be >= 1" in done.stderr
