"""Configuration files and flags, the ddpo command lines, and the generated code's freshness."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clients import RewardClient
from reward_server.config import ConfigError, load_config
from reward_server.server import build_rewards
from tests.support import ROOT, ServerProcess

DDPO = [sys.executable, "-m", "clients.cli"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


TOML = """
[server]
host = "127.0.0.1"
port = 0
max_concurrent_rpcs = 8

[rewards.jpeg_compressibility]
max_batch_size = 8
max_queue_delay_ms = 0

[rewards.small_jpegs]
type = "jpeg_incompressibility"
max_image_size = [64, 32]
instances = 2
"""

YAML = """
server:
  port: 0
rewards:
  jpeg_compressibility:
    max_batch_size: 8
    max_queue_delay_ms: 0
  small_jpegs:
    type: jpeg_incompressibility
    max_image_size: [64, 32]
    instances: 2
"""


@pytest.mark.parametrize(("suffix", "text"), [(".toml", TOML), (".yaml", YAML)])
def test_config_files_in_toml_and_yaml_agree(tmp_path: Path, suffix: str, text: str) -> None:
    path = tmp_path / f"server{suffix}"
    path.write_text(text)
    config = load_config(path)
    assert [(r.name, r.type) for r in config.rewards] == [
        ("jpeg_compressibility", "jpeg_compressibility"),
        ("small_jpegs", "jpeg_incompressibility"),
    ]
    assert config.rewards[0].batching.max_batch_size == 8
    assert config.rewards[1].batching.instances == 2
    (_, _), (small, _) = build_rewards(config.rewards)
    assert small.spec.name == "small_jpegs"
    assert small.spec.image_spec.max_size == (64, 32)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[server]\nprot = 1\n", "[server]: unknown key(s) prot; known keys:"),
        ("[rewards.jpeg_compressibility]\nbatch = 3\n", "[rewards.jpeg_compressibility]: unknown key(s) batch"),
        ("[reward.x]\n", "unknown key(s) reward; known keys: rewards, server"),
        ("[rewards.fancy]\n", "[rewards.fancy]: unknown reward type 'fancy'"),
        ("[rewards.jpeg_compressibility]\nmax_batch_size = 0\n", "max_batch_size must be >= 1, got 0"),
        (
            "[rewards.jpeg_compressibility]\nmax_batch_size = 8\nmax_queued_items = 4\n",
            "max_queued_items (4) must be >= max_batch_size (8)",
        ),
        ("[rewards.jpeg_compressibility]\nmax_image_size = 512\n", "max_image_size must be [height, width]"),
        (
            "[rewards.jpeg_compressibility]\noptions = { quality = 80 }\n",
            "takes no options; got unknown option(s) quality",
        ),
        ("[server]\nport = 70000\n", "port must be in 0..65535, got 70000"),
        ('[server]\nport = "fast"\n', "[server] port must be int, got str 'fast'"),
        ("[server]\nmetrics_port = true\n", "[server] metrics_port must be int or null, got bool"),
        ('[rewards.jpeg_compressibility]\nmax_queue_delay_ms = "5"\n', "max_queue_delay_ms must be float or int"),
        ('[server]\ntls_cert = "c.pem"\n', "tls_cert and tls_key go together"),
        ("[server\n", "cannot parse config file"),
    ],
)
def test_config_errors_name_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)

    def load_and_build() -> None:
        build_rewards(load_config(path).rewards)

    with pytest.raises((ConfigError, ValueError)) as caught:
        load_and_build()
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("text", "suggestion"),
    [
        ("[server]\nprot = 1\n", "port"),
        ("[reward.x]\n", "rewards"),
        ("[rewards.jpeg_compressibility]\nmax_batch_sise = 3\n", "max_batch_size"),
        ('[rewards.both]\ntype = "composite"\nweight = {}\n', "weights"),
    ],
)
def test_an_unknown_key_suggests_the_one_meant(tmp_path: Path, text: str, suggestion: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"unknown key\(s\) .*; known keys: .*\. Did you mean {suggestion}\?$"):
        load_config(path)


def test_an_unrelated_unknown_key_gets_no_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\ncolour = 1\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert "did you mean" not in str(raised.value).lower()


def test_yaml_reads_exponents_without_a_dot_as_floats(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads 5e-1 as a string; the server reads it as YAML 1.2 and TOML do."""
    path = tmp_path / "server.yaml"
    path.write_text(
        "server:\n  port: 0\n  grace_s: 1e1\n  health_interval_s: 5E-1\n  endpoints_file: e.json\n"
        "rewards:\n  jpeg_compressibility:\n    max_queue_delay_ms: 2.5e+0\n    max_batch_size: 8\n"
    )
    config = load_config(path)
    assert (config.grace_s, config.health_interval_s) == (10.0, 0.5)
    assert config.rewards[0].batching.max_queue_delay_ms == 2.5
    assert config.rewards[0].batching.max_batch_size == 8  # integers stay integers
    assert config.endpoints_file == Path("e.json")  # paths are written as strings
    path.write_text("server:\n  host: 1e5x\n")
    assert load_config(path).host == "1e5x"  # not a number: still a string


def test_config_file_suffix_and_missing_file(tmp_path: Path) -> None:
    ini = tmp_path / "server.ini"
    ini.write_text("[server]\n")
    with pytest.raises(ConfigError, match=r"must end in \.toml, \.yaml or \.yml"):
        load_config(ini)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--rewards", "jpeg_compressibility,aesthetic_v9"], "unknown reward(s) aesthetic_v9"),
        (["--rewards", ","], "--rewards is empty"),
        (["--port", "-3"], "port must be in 0..65535"),
        (["--config", "/nonexistent.toml"], "cannot read config file /nonexistent.toml"),
        (["--log-format", "xml"], "invalid choice: 'xml'"),
    ],
)
def test_serve_flag_errors_exit_2_with_a_message(args: list[str], fragment: str) -> None:
    result = run(*DDPO, "serve", *args)
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr


def test_served_config_applies_names_and_limits(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(TOML)
    with ServerProcess("--config", str(path)) as server, RewardClient(server.address) as client:
        infos = {r.name: r for r in client.list_rewards()}
        batch = client.score("small_jpegs", [np.zeros((64, 32, 3), np.uint8), np.zeros((65, 32, 3), np.uint8)])
    assert sorted(infos) == ["jpeg_compressibility", "small_jpegs"]
    assert infos["small_jpegs"].max_size == (64, 32)
    assert batch.items[0].ok
    assert "outside the accepted range 1x1 to 64x32" in batch.items[1].message


def test_ddpo_serve_and_ddpo_score_json(tmp_path: Path, photos: dict[str, np.ndarray]) -> None:
    png, jpeg, corrupt, text = (tmp_path / n for n in ("astronaut.png", "coffee.jpg", "corrupt.png", "notes.txt"))
    Image.fromarray(photos["astronaut"]).save(png)
    Image.fromarray(photos["coffee"]).save(jpeg, quality=90)
    corrupt.write_bytes(png.read_bytes()[:200])
    text.write_text("hello")
    missing = tmp_path / "missing.png"
    expected = {}
    for path in (png, jpeg):
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=95)
        expected[str(path)] = -len(buffer.getvalue()) / 1000
    ddpo = Path(sys.executable).with_name("ddpo")  # the installed console script, as a user runs it
    assert ddpo.exists(), "install the project (pip install -e '.[dev]') to get the ddpo command"
    with ServerProcess(command=[str(ddpo), "serve"]) as server:

        def score(*args: str) -> subprocess.CompletedProcess[str]:
            return run(*DDPO, "score", "--server", server.address, *args)

        ok = score("--reward", "jpeg_compressibility", "--json", str(png), str(jpeg))
        mixed = score("--reward", "jpeg_compressibility", "--json", str(png), str(corrupt), str(text), str(missing))
        unknown = score("--reward", "nope", str(png))
        plain = score("--reward", "jpeg_compressibility", str(jpeg))
    assert ok.returncode == 0, ok.stderr
    lines = [json.loads(line) for line in ok.stdout.splitlines()]
    assert lines == [{"file": f, "reward": "jpeg_compressibility", "score": s} for f, s in expected.items()]
    assert mixed.returncode == 1
    entries = [json.loads(line) for line in mixed.stdout.splitlines()]
    assert [e["file"] for e in entries] == [str(png), str(corrupt), str(text), str(missing)]
    assert entries[0]["score"] == expected[str(png)]
    assert "cannot decode PNG" in entries[1]["error"]
    assert entries[1]["error"].startswith("INVALID_ARGUMENT")
    assert "not a PNG or JPEG file" in entries[2]["error"]
    assert "No such file" in entries[3]["error"]
    assert unknown.returncode == 3
    assert "NOT_FOUND: unknown reward 'nope'" in unknown.stderr
    assert plain.returncode == 0
    assert plain.stdout.strip() == f"{jpeg}\tjpeg_compressibility\t{expected[str(jpeg)]:.6g}"


def test_ddpo_command_help_and_unknown_commands() -> None:
    listing = run(*DDPO, "--help")
    assert listing.returncode == 0
    assert "serve" in listing.stdout
    assert "score" in listing.stdout
    unknown = run(*DDPO, "trian")
    assert unknown.returncode == 2
    assert "unknown command 'trian'" in unknown.stderr
    assert run(sys.executable, "-m", "reward_server", "--help").returncode == 0


def test_generated_code_is_fresh() -> None:
    result = run(sys.executable, "scripts/gen_proto.py", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
