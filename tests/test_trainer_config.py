"""The trainer's configs: presets, overrides, files, and a clear error for every bad value."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from trainer.config import ConfigError, load_config, preset_names
from trainer.prompts import PromptSampler, load_prompts


def test_presets_derive_from_the_base_with_the_papers_settings() -> None:
    assert set(preset_names()) >= {"compressibility", "incompressibility", "aesthetic", "alignment", "tiny"}
    base = load_config(None)
    assert (base.sample.num_steps, base.sample.eta, base.sample.guidance_scale) == (50, 1.0, 5.0)
    assert (base.train.clip_range, base.train.adv_clip_max, base.train.algorithm) == (1e-4, 5.0, "ddpo_is")
    compress = load_config("compressibility")
    assert compress.samples_per_epoch() == 32
    assert compress.optimizer_steps_per_epoch() == 4
    incompress = load_config("incompressibility")
    assert incompress.reward.name == "jpeg_incompressibility"
    assert incompress.sample == compress.sample
    aesthetic = load_config("aesthetic")
    assert (aesthetic.reward.name, aesthetic.prompts.set, aesthetic.optimizer_steps_per_epoch()) == (
        "aesthetic",
        "simple_animals",
        2,
    )
    alignment = load_config("alignment")
    assert (alignment.reward.name, alignment.prompts.set, alignment.samples_per_epoch()) == (
        "llava_bertscore",
        "nouns_activities",
        48,
    )
    assert load_config("tiny").model == "tiny"


def test_overrides_parse_toml_values_and_bare_words() -> None:
    config = load_config(
        "tiny", ["train.learning_rate=1e-4", "model=some/model", "lora.enabled=false", "lora.target_modules=['to_q']"]
    )
    assert config.train.learning_rate == 1e-4
    assert config.model == "some/model"
    assert config.lora.enabled is False
    assert config.lora.target_modules == ["to_q"]
    assert load_config("tiny", ["train.max_grad_norm=2"]).train.max_grad_norm == 2.0  # int accepted for float


def test_files_toml_yaml_and_extends(tmp_path: Path) -> None:
    toml = tmp_path / "mine.toml"
    toml.write_text('extends = "tiny"\n[train]\nalgorithm = "rwr"\n')
    config = load_config(str(toml))
    assert (config.model, config.train.algorithm) == ("tiny", "rwr")
    yaml = tmp_path / "mine.yaml"
    yaml.write_text("extends: tiny\nsample:\n  num_steps: 7\n")
    assert load_config(str(yaml)).sample.num_steps == 7


def test_yaml_reads_exponents_without_a_dot_as_floats(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads 1e-4 as a string; the config reads it as YAML 1.2 and TOML do."""
    yaml = tmp_path / "mine.yaml"
    yaml.write_text("extends: tiny\ntrain:\n  learning_rate: 1e-4\n  clip_range: 2E-3\n  batch_size: 2\nseed: 7\n")
    config = load_config(str(yaml))
    assert config.train.learning_rate == 1e-4
    assert config.train.clip_range == 2e-3
    assert (config.train.batch_size, config.seed) == (2, 7)  # integers stay integers
    yaml.write_text("extends: tiny\nmodel: 1e5x\n")
    assert load_config(str(yaml)).model == "1e5x"  # not a number: still a string


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("train.learning_rat", "train.learning_rate"),  # misspelled
        ("learning_rate", "train.learning_rate"),  # in the wrong section
        ("sample.guidance", "sample.guidance_scale"),
        ("lora.rnk", "lora.rank"),
    ],
)
def test_a_misspelled_key_gets_a_suggestion(key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown config key {re.escape(key)};.*Did you mean {suggestion}\?$"):
        load_config("tiny", [f"{key}=1"])


def test_an_unrelated_key_gets_no_suggestion() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", ["totally.bogus=1"])
    assert "did you mean" not in str(raised.value).lower()


@pytest.mark.parametrize(
    ("source", "overrides", "message"),
    [
        ("tiny", ["learning_rate=1"], r"unknown config key learning_rate; known keys here: .*train"),
        ("tiny", ["train.lr=1"], r"unknown config key train\.lr; known keys here: .*learning_rate"),
        ("tiny", ["train.batch_size='four'"], r"train\.batch_size must be int, got 'four'"),
        ("tiny", ["train.batch_size=true"], r"train\.batch_size must be int, got True"),
        ("tiny", ["train.algorithm='ppo'"], r"train\.algorithm = 'ppo' is not one of 'ddpo_is'"),
        ("tiny", ["train=3"], r"train must be a table"),
        ("tiny", ["train.batch_size=3"], r"samples per epoch .* = 16\) must be divisible by train\.batch_size \(3\)"),
        (
            "tiny",
            ["train.batch_size=4", "train.gradient_accumulation_steps=3"],
            r"the 4 minibatches .* divisible by train\.gradient_accumulation_steps \(3\)",
        ),
        (
            "tiny",
            ["sample.images_per_prompt=3"],
            r"sample\.images_per_prompt \(3\) must divide sample\.batch_size \(8\)",
        ),
        ("tiny", ["sample.eta=0"], r"sample\.eta must be > 0"),
        ("tiny", ["train.timestep_fraction=1.5"], r"timestep_fraction must be in \(0, 1\]"),
        ("tiny", ["train.learning_rate=-1"], r"train\.learning_rate must be > 0"),
        (
            "tiny",
            ["train.algorithm='sparse_rwr'"],
            r"needs exactly one of train\.sparse_threshold and train\.sparse_percentile",
        ),
        ("tiny", ["train.sparse_percentile=150"], r"sparse_percentile must be in \[0, 100\]"),
        ("tiny", ["stat_tracking.min_count=99"], r"min_count \(99\) cannot exceed stat_tracking\.buffer_size"),
        ("tiny", ["prompts.set='from_file'"], r"needs prompts\.file"),
        ("tiny", ["prompts.set='shape'"], r"prompts\.set = 'shape' is not a prompt set; use one of .*shapes_heldout"),
        ("tiny", ["eval.set='from_file'"], r"needs eval\.file"),
        ("tiny", ["eval.every=-1"], r"eval\.every must be >= 0"),
        ("tiny", ["eval.samples_per_prompt=0"], r"eval\.samples_per_prompt must be > 0"),
        ("tiny", ["novalue"], r"override 'novalue' is not key=value"),
        ("tiny", ["train.batch_size.x=1"], r"'batch_size' is a value, not a section"),
        ("nope", [], r"unknown config 'nope': use a file path or one of .*tiny"),
        ("missing.toml", [], r"config file 'missing\.toml' does not exist"),
    ],
)
def test_config_errors_name_the_key_and_the_fix(source: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(source, overrides)


def test_broken_files_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="is not valid"):
        load_config(str(bad))
    loop = tmp_path / "loop.toml"
    loop.write_text(f'extends = "{loop}"\n')
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(str(loop))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a table"):
        load_config(str(listing))
    other = tmp_path / "config.json"
    other.write_text("{}")
    with pytest.raises(ConfigError, match=r"use a \.toml, \.yaml or \.yml file"):
        load_config(str(other))


def test_prompt_sets() -> None:
    simple = load_prompts("simple_animals")
    assert len(simple) == 45
    assert simple[:3] == ["cat", "dog", "horse"]
    imagenet = load_prompts("imagenet_animals")
    assert len(imagenet) == 398
    # ImageNet's class names whole, as ddpo-pytorch's imagenet_classes.txt (lines 1-398)
    assert imagenet[0] == "tench, Tinca tinca"
    assert imagenet[2] == "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias"
    assert imagenet[-1] == "puffer, pufferfish, blowfish, globefish"
    assert sum("," in prompt for prompt in imagenet) == 225
    activities = load_prompts("nouns_activities")
    assert len(activities) == 45 * 3
    assert {"a cat washing the dishes", "an ant riding a bike", "a kangaroo playing chess"} <= set(activities)
    with pytest.raises(ValueError, match="unknown prompt set 'animals'"):
        load_prompts("animals")


def test_prompt_file(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n  a blue square  \n")
    assert load_prompts("from_file", str(path)) == ["a red circle", "a blue square"]
    path.write_text("\n \n")
    with pytest.raises(ValueError, match="has no prompts"):
        load_prompts("from_file", str(path))
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="is not UTF-8"):
        load_prompts("from_file", str(path))
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts("from_file", str(tmp_path / "none.txt"))


def test_prompt_sampler_is_seeded_and_groups_prompts() -> None:
    prompts = load_prompts("simple_animals")
    first, second = PromptSampler(prompts, seed=3), PromptSampler(prompts, seed=3)
    assert first.sample(8) == second.sample(8)
    grouped = first.sample(8, images_per_prompt=4)
    assert grouped[:4] == [grouped[0]] * 4
    assert grouped[4:] == [grouped[4]] * 4
    with pytest.raises(ValueError, match="must divide the batch size"):
        first.sample(8, images_per_prompt=3)
    assert isinstance(first.rng, np.random.Generator)
