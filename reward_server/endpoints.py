"""Remote endpoints registered at runtime (through the RewardAdmin service), and the endpoints file that keeps them.

An endpoint is a remote reward (``reward_server.rewards.remote``) served under a name of its own. It serves once it
has answered, in the server's ``RewardRegistry``; every change is saved to ``endpoints_file`` at once, and the next
server reads them back (``read_endpoints_file``) and serves them again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import grpc

from clients.errors import RewardServiceError
from reward_server.builder import build_rewards
from reward_server.config import BATCHING_KEYS, ConfigError, RewardConfig, parse_config, reward_config, reward_table
from reward_server.registry import LOADING, RewardRegistry
from reward_server.rewards import RewardSpec
from reward_server.rewards.catalog import PluginError, check_name
from reward_server.rewards.remote import REMOTE

log = logging.getLogger(__name__)

# Keys of an endpoint's options that are settings of its [rewards.NAME] table rather than of the remote reward.
_TABLE_KEYS = {"max_image_size", *BATCHING_KEYS}


class EndpointError(Exception):
    """An admin request the server cannot carry out, with the status code to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RuntimeEndpoints:
    """Registers and unregisters endpoints in ``registry`` one at a time, saving them to ``path`` if it is set."""

    def __init__(self, registry: RewardRegistry, path: Path | None) -> None:
        self._registry = registry
        self._path = path
        self._lock = asyncio.Lock()

    async def register(self, name: str, url: str, options: dict[str, Any], replace: bool) -> RewardSpec:
        """Serve the endpoint at ``url`` as ``name`` once it answers; EndpointError with a status code otherwise."""
        try:
            check_name(name, "endpoint name")
            table = {key: value for key, value in options.items() if key in _TABLE_KEYS}
            table |= {"type": REMOTE, "options": {"url": url} | {k: v for k, v in options.items() if k not in table}}
            config = reward_config(name, table)
            ((reward, batching),) = build_rewards([config])
        except (ConfigError, PluginError, ValueError) as error:
            raise EndpointError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        registry = self._registry
        async with self._lock:
            runtime = registry.is_runtime_endpoint(name)
            if name in registry.specs and not (replace and runtime):
                reason = "set replace to swap it" if runtime else "it is not a runtime endpoint"
                raise EndpointError(grpc.StatusCode.ALREADY_EXISTS, f"reward {name!r} is already served; {reason}")
            try:
                await asyncio.to_thread(reward.load)
            except RewardServiceError as error:
                raise EndpointError(error.code, error.message) from None
            except Exception as error:
                raise EndpointError(grpc.StatusCode.FAILED_PRECONDITION, f"{type(error).__name__}: {error}") from None
            await registry.serve_endpoint(config, reward, batching)
            self._save()
        log.info("endpoint registered", extra={"reward": name, "url": url, "replaced": replace})
        return reward.spec

    async def unregister(self, name: str) -> None:
        registry = self._registry
        async with self._lock:
            if name not in registry.specs:
                raise EndpointError(
                    grpc.StatusCode.NOT_FOUND, f"no reward {name!r}; served: {', '.join(sorted(registry.specs))}"
                )
            if not registry.is_runtime_endpoint(name):
                raise EndpointError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"reward {name!r} was not registered at runtime; it comes from the server's config",
                )
            if registry.state(name) == LOADING:  # its loader would serve it after it is gone
                raise EndpointError(grpc.StatusCode.UNAVAILABLE, f"reward {name!r} is still loading; try again")
            users = registry.composites_using(name)
            if users:
                raise EndpointError(
                    grpc.StatusCode.FAILED_PRECONDITION, f"composite(s) {', '.join(users)} use {name!r}"
                )
            await registry.remove_endpoint(name)
            self._save()
        log.info("endpoint unregistered", extra={"reward": name})

    def _save(self) -> None:
        """Write the runtime endpoints to the endpoints file (atomically: a crash leaves the old file or the new)."""
        if self._path is None:
            return
        data = {"rewards": {config.name: reward_table(config) for config in self._registry.runtime_endpoints()}}
        temporary = self._path.with_name(self._path.name + ".tmp")
        temporary.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(temporary, self._path)


def read_endpoints_file(path: Path | None, configured: set[str]) -> list[RewardConfig]:
    """The endpoints saved by an earlier run (none if ``path`` is None or does not exist yet)."""
    if path is None or not path.exists():
        return []
    source = f"endpoints file {path}"
    try:
        saved = parse_config(json.loads(path.read_text()), source=source).rewards
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read {source}: {error}") from None
    for config in saved:
        if config.type != REMOTE:
            raise ConfigError(f"{source}: {config.name!r} is of type {config.type!r}; it may only hold remote rewards")
        if config.name in configured:
            raise ConfigError(f"{source}: {config.name!r} is also in the config; remove it from one of them")
    return list(saved)
