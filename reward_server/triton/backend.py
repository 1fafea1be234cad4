"""Our reward objects behind Triton tensors (``clients.triton_contract``), for the Python backend and PyTriton.

Triton hands the Python backend a list of requests, one per client call, and does not stack a dynamic batch into one
tensor: ``score_requests`` validates every request's items, scores all valid items of all requests in one
``Reward.score`` call, and splits the answers back per request. Items are checked like the gRPC server checks them,
and each one gets its own answer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import json_format

from clients import triton_contract as tc
from reward_server.batching import ItemOutcome, score_items
from reward_server.builder import build_rewards
from reward_server.config import BATCHING_KEYS, ConfigError, RewardConfig, parse_config, reward_table
from reward_server.plugins import plugin_module
from reward_server.rewards import ItemError, Reward
from reward_server.wire import DecodedItem, ItemInvalid, check_prompt, spec_to_proto


class RequestInvalid(ValueError):
    """A request whose tensors do not fit together; it fails as a whole (INVALID_ARGUMENT)."""


# --- the reward's recipe, carried in the model config ------------------------------------------------------------


def reward_config_json(config: RewardConfig) -> str:
    """How the model builds its reward: a server config (JSON) with the reward's table, and the plugin module that
    provides its type, if any."""
    table = {key: value for key, value in reward_table(config).items() if key not in BATCHING_KEYS}
    data: dict[str, Any] = {"rewards": {config.name: table}}
    module = plugin_module(config.type)
    if module is not None:
        data["server"] = {"plugins": [module]}
    return json.dumps(data, sort_keys=True)


def reward_from_config_json(text: str, gpu: int | None) -> Reward:
    """Build (not load) the reward ``reward_config_json`` describes; on a GPU instance, place it on that GPU."""
    try:
        (config,) = parse_config(json.loads(text), source=tc.REWARD_PARAMETER).rewards
    except (ValueError, TypeError) as error:  # ConfigError, JSONDecodeError, not exactly one reward
        raise ConfigError(f"model parameter {tc.REWARD_PARAMETER} is not a single reward's table: {error}") from None
    if gpu is not None:
        config = dataclasses.replace(config, options={**config.options, "device": f"cuda:{gpu}"})
    ((reward, _),) = build_rewards([config])
    return reward


def spec_json(reward: Reward) -> str:
    """The reward's spec as ``ListRewards`` returns it, in protobuf's JSON mapping."""
    return json_format.MessageToJson(spec_to_proto(reward.spec), indent=None, sort_keys=True)


# --- tensors in, tensors out ---------------------------------------------------------------------------------------


def _entries(tensor: npt.NDArray[Any] | None, name: str, count: int) -> list[str] | None:
    """The UTF-8 strings of a BYTES tensor of shape [n] or [n, 1]."""
    if tensor is None:
        return None
    if tensor.shape not in ((count,), (count, 1)):
        raise RequestInvalid(f"{name} has shape {list(tensor.shape)}; expected [{count}, 1], one entry per image")
    texts = []
    for index, entry in enumerate(tensor.reshape(count)):
        try:
            texts.append(entry.decode() if isinstance(entry, bytes) else str(entry))
        except UnicodeDecodeError:
            raise RequestInvalid(f"{name}[{index}] is not UTF-8 text") from None
    return texts


def items_from_tensors(
    reward: Reward,
    images: npt.NDArray[Any],
    prompts: npt.NDArray[Any] | None = None,
    metadata: npt.NDArray[Any] | None = None,
) -> list[DecodedItem | ItemError]:
    """Validate one request: RequestInvalid if its tensors do not fit together, else one entry per item."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise RequestInvalid(f"IMAGES must be UINT8 [n, H, W, C], got {images.dtype} {list(images.shape)}")
    count = len(images)
    prompt_texts = _entries(prompts, tc.PROMPTS, count)
    metadata_texts = _entries(metadata, tc.METADATA, count)
    spec = reward.spec
    items: list[DecodedItem | ItemError] = []
    for index, image in enumerate(images):
        try:
            problem = spec.image_spec.check(*image.shape)
            if problem is not None:
                raise ItemInvalid(f"{tc.IMAGES}[{index}]: image {problem}")
            prompt = (prompt_texts[index] or None) if prompt_texts is not None else None
            check_prompt(prompt, f"{tc.PROMPTS}[{index}]", spec)
            meta = _metadata(metadata_texts[index], index) if metadata_texts is not None else {}
            items.append(DecodedItem(id=str(index), image=image, prompt=prompt, metadata=meta))
        except ItemInvalid as invalid:
            items.append(invalid.error)
    return items


def _metadata(text: str, index: int) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ItemInvalid(f"{tc.METADATA}[{index}] is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise ItemInvalid(f"{tc.METADATA}[{index}] must be a JSON object, got {type(value).__name__}")
    return value


def score_requests(reward: Reward, requests: Sequence[Sequence[DecodedItem | ItemError]]) -> list[list[ItemOutcome]]:
    """Score the valid items of every request in one batch; answers come back per request, in item order."""
    valid = [item for items in requests for item in items if isinstance(item, DecodedItem)]
    scored = iter(
        score_items(reward, [i.image for i in valid], [i.prompt for i in valid], [i.metadata for i in valid])
        if valid
        else []
    )
    return [
        [next(scored) if isinstance(item, DecodedItem) else ItemOutcome(item) for item in items] for items in requests
    ]


def answer_requests(
    reward: Reward, requests: Sequence[Mapping[str, npt.NDArray[Any] | None]]
) -> list[dict[str, npt.NDArray[Any]]]:
    """The output tensors of each request of a dynamic batch (input tensors by name; optional ones may be absent).

    A request whose tensors do not fit together has each of its items answered with INVALID_ARGUMENT and the
    reason, so that the other requests batched with it are still scored."""
    checked: list[list[DecodedItem | ItemError]] = []
    for tensors in requests:
        images = tensors[tc.IMAGES]
        assert images is not None, "Triton requires IMAGES"
        try:
            checked.append(items_from_tensors(reward, images, tensors.get(tc.PROMPTS), tensors.get(tc.METADATA)))
        except RequestInvalid as invalid:
            checked.append([ItemError(grpc.StatusCode.INVALID_ARGUMENT, str(invalid))] * len(images))
    return [output_tensors(outcomes) for outcomes in score_requests(reward, checked)]


def output_tensors(outcomes: Sequence[ItemOutcome]) -> dict[str, npt.NDArray[Any]]:
    """SCORES (FP32 [n, 1], NaN where failed) and INFO (BYTES [n, 1]) for one request."""
    scores = np.array([[outcome.score] for outcome in outcomes], dtype=np.float32).reshape(len(outcomes), 1)
    info = np.array(
        [
            [
                tc.encode_answer(
                    (outcome.error.code.name, outcome.error.message) if outcome.error is not None else None,
                    outcome.components,
                    outcome.info,
                )
            ]
            for outcome in outcomes
        ],
        dtype=np.object_,
    ).reshape(len(outcomes), 1)
    return {tc.SCORES: scores, tc.INFO: info}


# --- Triton's Python backend -------------------------------------------------------------------------------------


class TritonRewardModel:
    """What a generated ``model.py`` runs: ``TritonPythonModel`` subclasses this with Triton's ``pb_utils``."""

    def __init__(self, pb_utils: Any) -> None:
        self._pb = pb_utils
        self.reward: Reward | None = None

    def initialize(self, args: Mapping[str, str]) -> None:
        """Build and load the reward named by the model config; raising here marks the model UNAVAILABLE."""
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        if tc.REWARD_PARAMETER not in parameters:
            raise ConfigError(
                f"model {args['model_name']!r} has no {tc.REWARD_PARAMETER} parameter; "
                "write its repository with `ddpo triton export`"
            )
        gpu = int(args["model_instance_device_id"]) if args["model_instance_kind"] == "GPU" else None
        # The stub's embedded interpreter does not read PYTHONPATH; plugins found through it by `ddpo serve` must be
        # found by the model too.
        for folder in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
            if folder and folder not in sys.path:
                sys.path.insert(0, folder)
        reward = reward_from_config_json(parameters[tc.REWARD_PARAMETER], gpu)
        reward.load()
        self.reward = reward

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        assert self.reward is not None, "initialize was not called"
        pb = self._pb
        tensors = []
        for request in requests:
            inputs = {name: pb.get_input_tensor_by_name(request, name) for name in (tc.IMAGES, tc.PROMPTS, tc.METADATA)}
            tensors.append({name: tensor.as_numpy() for name, tensor in inputs.items() if tensor is not None})
        return [
            pb.InferenceResponse([pb.Tensor(name, value) for name, value in outputs.items()])
            for outputs in answer_requests(self.reward, tensors)
        ]
