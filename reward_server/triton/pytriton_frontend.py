"""``ddpo serve --frontend pytriton``: the same rewards bound with PyTriton, a Triton server without a container.

PyTriton starts the tritonserver bundled in its wheel and forwards each dynamic batch's requests to a Python
function in this process; that function is ``answer_requests``, as in the exported Python-backend models, so the
tensors, per-item answers and scores are the same. The ``triton://`` client talks to it on ``--port``.

PyTriton loads its models through Triton's load API, so they are not in a repository index and the client cannot
list them (``list_rewards`` says so): ``ddpo train`` and ``ddpo eval`` then only wait until the server is ready
(``clients.connect.check_rewards``), and a missing reward shows in its answers.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import numpy as np

from clients import triton_contract as tc
from reward_server.builder import build_rewards
from reward_server.config import ConfigError, ServerConfig
from reward_server.ports import check_free
from reward_server.rewards import Reward
from reward_server.triton.backend import answer_requests
from reward_server.triton.launch import python_library_path

log = logging.getLogger(__name__)


def _infer_function(reward: Reward) -> Callable[[Sequence[Any]], list[dict[str, Any]]]:
    def infer(requests: Sequence[Any]) -> list[dict[str, Any]]:
        return answer_requests(reward, [request.data for request in requests])

    return infer


def serve_pytriton(
    config: ServerConfig, http_port: int, on_started: Callable[[ServerConfig, list[str]], None] | None = None
) -> None:
    """Load the rewards, bind each as a model, and serve until SIGTERM/SIGINT."""
    if config.tls_cert or config.auth_token_file:
        raise ConfigError("--frontend pytriton does not take TLS or token settings; put Triton behind a proxy for them")
    metrics_port = config.metrics_port if config.metrics_port is not None else 8002
    for port, what in (
        (config.port, "Triton's gRPC port"),
        (http_port, "Triton's HTTP port"),
        (metrics_port, "Triton's metrics port"),
    ):
        check_free(config.host, port, what)
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    # PyTriton starts tritonserver with this process's environment (plus its own libraries)
    os.environ["LD_LIBRARY_PATH"] = python_library_path(dict(os.environ))
    rewards = build_rewards(config.rewards)
    for reward, _ in rewards:
        reward.load()
    triton_config = TritonConfig(
        grpc_address=config.host,
        grpc_port=config.port,
        http_address=config.host,
        http_port=http_port,
        metrics_port=metrics_port,
        metrics_address=config.host,
        exit_timeout_secs=round(config.grace_s),
    )
    inputs = [
        Tensor(name=tc.IMAGES, dtype=np.uint8, shape=(-1, -1, 3)),
        Tensor(name=tc.PROMPTS, dtype=bytes, shape=(1,), optional=True),
        Tensor(name=tc.METADATA, dtype=bytes, shape=(1,), optional=True),
    ]
    outputs = [Tensor(name=tc.SCORES, dtype=np.float32, shape=(1,)), Tensor(name=tc.INFO, dtype=bytes, shape=(1,))]
    # PyTriton guards Triton's repository API with a generated token; `triton://` clients list the rewards through
    # the repository index, so it stays open. Like every ddpo server, it binds to loopback unless told otherwise.
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "PyTriton frontend on %s: Triton's repository API (load/unload) is reachable from there", config.host
        )
    security = TritonSecurityConfig(restricted_endpoints=[])
    with Triton(config=triton_config, security_config=security) as triton:
        for reward, batching in rewards:
            max_batch_size = batching.max_batch_size or reward.preferred_max_batch_size
            delay_us = round(batching.max_queue_delay_ms * 1000)
            triton.bind(
                model_name=reward.spec.name,
                infer_func=_infer_function(reward),
                inputs=inputs,
                outputs=outputs,
                config=ModelConfig(max_batch_size=max_batch_size, batcher=DynamicBatcher(delay_us)),
            )

        def stop(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt  # Triton.serve stops the server on it

        signal.signal(signal.SIGTERM, stop)
        triton.run()
        if on_started is not None:
            on_started(config, [reward.spec.name for reward, _ in rewards])
        triton.serve()
