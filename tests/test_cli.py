"""The ``ddpo`` command as a newcomer meets it: --version, ``ddpo rewards``, help with examples, usage errors that say
what to type instead, token files refused the same way by every command, and missing extras named, not traced back.
"""

from __future__ import annotations

import importlib.metadata
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clients import cli
from clients.cli_support import read_token_file
from reward_server.cli import build_parser as serve_parser
from tests.support import ROOT, ServerProcess, free_port, plugin_env
from trainer.cli import build_parser as train_parser
from trainer.config import load_config

DDPO = (sys.executable, "-m", "clients.cli")


def ddpo(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DDPO, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def ddpo_without(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``ddpo ARGS`` in a Python where ``module`` cannot be imported, as if its extra were not installed."""
    code = f"import sys; sys.modules[{module!r}] = None; from clients.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------------------------------------- --version


def test_version_prints_the_installed_version() -> None:
    done = ddpo("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"ddpo {importlib.metadata.version('ddpo')}\n"


def test_version_says_so_when_the_package_is_not_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("ddpo unknown (not installed; `pip install -e .`")


# ------------------------------------------------------------------------------------------------------ ddpo rewards

PLUGIN = """
from reward_server.plugins import Reward, RewardSpec, register_reward_type, reward


@reward(name="darkness", description="255 minus the mean pixel", units="level", higher_is_better=False)
def darkness(images, prompts, metadata):
    return [255.0 - float(image.mean()) for image in images]


@register_reward_type("no_weights")
class NoWeights(Reward):
    def __init__(self, name):
        self.spec = RewardSpec(name=name, description="a model whose weights are missing", version="1", units="")

    def load(self):
        raise OSError("no weights at /models/missing.safetensors")

    def score(self, images, prompts, metadata):
        raise AssertionError("never loaded, never called")
"""


def test_rewards_lists_each_reward_with_units_direction_and_state(tmp_path: Path) -> None:
    (tmp_path / "cli_test_rewards.py").write_text(PLUGIN)
    rewards = "jpeg_compressibility,darkness,no_weights"
    with ServerProcess("--plugin", "cli_test_rewards", "--rewards", rewards, env=plugin_env(tmp_path)) as server:
        done = ddpo("rewards", "--server", server.address)
    assert done.returncode == 0, done.stderr
    header, *rows = (line.split("\t") for line in done.stdout.splitlines())
    assert header == ["NAME", "UNITS", "DIRECTION", "STATE", "DESCRIPTION"]
    assert rows == [
        ["darkness", "level", "lower is better", "serving", "255 minus the mean pixel"],
        [
            "jpeg_compressibility",
            "kB",
            "higher is better",
            "serving",
            "Negative JPEG size (Pillow, quality 95) in kB: smaller files score higher",
        ],
        [
            "no_weights",
            "-",
            "higher is better",
            "failed to load: OSError: no weights at /models/missing.safetensors",
            "a model whose weights are missing",
        ],
    ]


def test_rewards_from_a_server_that_is_not_there_exits_3_naming_it() -> None:
    address = f"127.0.0.1:{free_port()}"
    done = ddpo("rewards", "--server", address)
    assert done.returncode == 3
    assert f"ddpo rewards: reward service at {address}: ListRewards: UNAVAILABLE" in done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------ help and usage


def _examples(help_text: str, command: str) -> list[list[str]]:
    """The arguments of each example command line after the help's "examples:" heading."""
    section = help_text.split("\nexamples:\n", 1)[1].split("\n\n", 1)[0]
    lines = [shlex.split(line) for line in section.splitlines()]
    assert all(line[:2] == ["ddpo", command] for line in lines), section
    return [line[2:] for line in lines]


def test_serve_help_shows_example_command_lines_that_parse() -> None:
    done = ddpo("serve", "--help")
    assert done.returncode == 0, done.stderr
    examples = _examples(done.stdout, "serve")
    assert 2 <= len(examples) <= 3
    for args in examples:
        serve_parser().parse_args(args)  # an unknown flag or a bad value exits 2 here


def test_train_help_shows_example_command_lines_with_real_presets_and_keys() -> None:
    done = ddpo("train", "--help")
    assert done.returncode == 0, done.stderr
    examples = _examples(done.stdout, "train")
    assert 2 <= len(examples) <= 3
    for args in examples:
        parsed = train_parser().parse_intermixed_args(args)
        load_config(parsed.config, parsed.overrides)  # ConfigError for an unknown preset or key


@pytest.mark.parametrize(
    ("subcommand", "fragment"),
    [
        ("export", "Write a Triton model repository with one Python-backend model per reward"),
        ("serve", "Run tritonserver on a model repository written by `ddpo triton export`"),
    ],
)
def test_triton_subcommands_describe_themselves(subcommand: str, fragment: str) -> None:
    done = ddpo("triton", subcommand, "--help")
    assert done.returncode == 0, done.stderr
    assert fragment in " ".join(done.stdout.split())  # argparse wraps the description


def test_score_given_a_folder_suggests_images(tmp_path: Path) -> None:
    folder = tmp_path / "my images"
    folder.mkdir()
    done = ddpo("score", str(folder))
    assert done.returncode == 2
    assert f"is a folder; to score every image in it, use --images '{folder}' --out OUTDIR" in done.stderr


# ----------------------------------------------------------------------------------------------------- token files


def test_the_token_reader_refuses_a_missing_unreadable_or_empty_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("  s3cret\n")
    assert read_token_file(token, "--auth-token-file") == "s3cret"
    blank = tmp_path / "blank"
    blank.write_text(" \n")
    cases = {
        tmp_path / "missing": "cannot read it (No such file or directory); it must be a file holding the token",
        tmp_path: "cannot read it (Is a directory)",
        blank: "is empty; it must hold the bearer token",
    }
    for path, fragment in cases.items():
        with pytest.raises(ValueError, match=r"^--flag '.+'") as refused:
            read_token_file(path, "--flag")
        assert fragment in str(refused.value)


EVAL = "eval --model tiny --prompts shapes_heldout --samples-per-prompt 1 --seed 0 --rewards jpeg_compressibility"


@pytest.mark.parametrize(
    ("command", "source"),
    [
        ("score --reward jpeg_compressibility a.png --auth-token-file {}", "--auth-token-file"),
        ("rewards --auth-token-file {}", "--auth-token-file"),
        ("admin --admin-token-file {} list", "--admin-token-file"),
        (EVAL + " --reward-server 127.0.0.1:9 --out out --auth-token-file {}", "--auth-token-file"),
        ("train --config tiny --reward-server 127.0.0.1:9 --auth-token-file {}", "reward.token_file"),
        ("serve --port 0 --auth-token-file {}", "--auth-token-file"),
        ("serve --port 0 --admin-token-file {}", "--admin-token-file"),
    ],
    ids=["score", "rewards", "admin", "eval", "train", "serve-auth", "serve-admin"],
)
def test_every_command_refuses_an_empty_or_missing_token_file_the_same_way(
    command: str, source: str, tmp_path: Path
) -> None:
    empty, missing = tmp_path / "empty.token", tmp_path / "missing.token"
    empty.write_text("\n")
    for path, fragment in ((empty, "is empty; it must hold the bearer token"), (missing, "cannot read it (No such")):
        done = ddpo(*(str(path) if arg == "{}" else arg for arg in command.split()))
        assert done.returncode == 2, done.stderr
        assert f"error: {source} '{path}'" in done.stderr
        assert fragment in done.stderr


# -------------------------------------------------------------------------------------------------- missing extras


def test_serve_help_without_the_server_extra_names_it() -> None:
    done = ddpo_without("grpc_reflection", "serve", "--help")
    assert done.returncode == 2
    assert done.stderr == (
        "ddpo serve needs the 'server' extra ('grpc_reflection' is not installed): pip install 'ddpo[server]'\n"
    )


def test_score_on_triton_without_the_triton_extra_names_it(tmp_path: Path) -> None:
    image = tmp_path / "black.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    done = ddpo_without("tritonclient", "score", "--reward", "r", "--server", "triton://127.0.0.1:9", str(image))
    assert done.returncode == 2
    assert done.stderr == (
        "ddpo score needs the 'triton' extra ('tritonclient' is not installed): pip install 'ddpo[triton]'\n"
    )


def test_train_without_torch_names_the_trainer_extra(jpeg_server: ServerProcess, tmp_path: Path) -> None:
    """torch is imported once the service has been checked, in the middle of the command: still no traceback."""
    done = ddpo_without(
        "torch", "train", "--config", "tiny", "--reward-server", jpeg_server.address, "--run-dir", str(tmp_path)
    )
    assert done.returncode == 2
    assert done.stderr.endswith(
        "ddpo train needs the 'trainer' extra ('torch' is not installed): pip install 'ddpo[trainer]'\n"
    )
    assert "Traceback" not in done.stderr
