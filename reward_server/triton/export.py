"""Write a Triton model repository: one Python-backend model per reward, in Triton's standard layout.

    <out>/<reward>/config.pbtxt     inputs, outputs, max_batch_size, dynamic_batching, instance_group, and the
                                    reward's recipe and spec as parameters
    <out>/<reward>/1/model.py       builds the same reward object as ``ddpo serve`` (reward_server.triton.backend)

The batching settings come from the reward's server config: ``max_batch_size`` and ``instances`` (default: the
reward's preference) and ``max_queue_delay_ms``. A reward whose ``device`` option is a GPU gets KIND_GPU instances,
each placed on the GPU Triton gives it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from clients import triton_contract as tc
from reward_server.builder import build_rewards
from reward_server.composite import COMPOSITE
from reward_server.config import RewardConfig
from reward_server.rewards.remote import REMOTE
from reward_server.triton.backend import reward_config_json, spec_json

MODEL_PY = '''\
"""Triton Python-backend entry point of one ddpo reward, written by `ddpo triton export`.

The reward and its options are in config.pbtxt's parameters. reward_server.triton.backend builds the same reward
object as the ddpo gRPC server, validates each request's items and scores all requests of a dynamic batch together.
"""

import triton_python_backend_utils as pb_utils

from reward_server.triton.backend import TritonRewardModel


class TritonPythonModel(TritonRewardModel):
    def __init__(self):
        super().__init__(pb_utils)
'''


def _text(value: str) -> str:
    """A protobuf text-format string literal (JSON escaping of ASCII text is a subset of it)."""
    return json.dumps(value, ensure_ascii=True)


def model_config(config: RewardConfig) -> str:
    """The ``config.pbtxt`` of one reward."""
    ((reward, batching),) = build_rewards([config])
    max_batch_size = batching.max_batch_size or reward.preferred_max_batch_size
    instances = batching.instances or reward.preferred_instances
    kind = "KIND_GPU" if str(config.options.get("device", "cpu")).startswith("cuda") else "KIND_CPU"
    delay_us = round(batching.max_queue_delay_ms * 1000)
    return f"""\
# Written by `ddpo triton export`: change the ddpo reward config and export again rather than edit this file.
name: {_text(config.name)}
backend: "python"
max_batch_size: {max_batch_size}
input [
  {{ name: "{tc.IMAGES}" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }},
  {{ name: "{tc.PROMPTS}" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "{tc.METADATA}" data_type: TYPE_STRING dims: [ 1 ] optional: true }}
]
output [
  {{ name: "{tc.SCORES}" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "{tc.INFO}" data_type: TYPE_STRING dims: [ 1 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ count: {instances} kind: {kind} }} ]
parameters {{ key: "{tc.REWARD_PARAMETER}" value {{ string_value: {_text(reward_config_json(config))} }} }}
parameters {{ key: "{tc.SPEC_PARAMETER}" value {{ string_value: {_text(spec_json(reward))} }} }}
"""


def repository_files(configs: Sequence[RewardConfig]) -> dict[Path, str]:
    """Every file of the repository, by path relative to its root. ValueError for a composite or a remote reward:
    the ddpo server computes composites from its own rewards, and forwards remote ones (export what they forward to,
    on the server that runs it)."""
    unexportable = [f"{c.name} ({c.type})" for c in configs if c.type in (COMPOSITE, REMOTE)]
    if unexportable:
        raise ValueError(
            f"cannot export {', '.join(unexportable)} to Triton: composites and remote endpoints are served by "
            "`ddpo serve`; leave them out with --rewards"
        )
    files: dict[Path, str] = {}
    for config in configs:
        files[Path(config.name, "config.pbtxt")] = model_config(config)
        files[Path(config.name, "1", "model.py")] = MODEL_PY
    return files


def export_repository(configs: Sequence[RewardConfig], out: Path) -> list[Path]:
    """Write the repository under ``out`` (other models already there are kept); returns the files written."""
    written = []
    for relative, text in repository_files(configs).items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def repository_differences(configs: Sequence[RewardConfig], out: Path) -> list[str]:
    """How ``out`` differs from what ``export_repository`` would write: missing, changed and extra files."""
    expected = repository_files(configs)
    found = {path.relative_to(out) for path in out.rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    problems = [f"missing: {path}" for path in sorted(set(expected) - found)]
    problems += [
        f"differs: {path}" for path in sorted(set(expected) & found) if (out / path).read_text() != expected[path]
    ]
    problems += [f"not exported: {path}" for path in sorted(found - set(expected))]
    return problems
