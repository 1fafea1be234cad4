"""Server configuration: a TOML or YAML file, overridden by command-line flags.

    [server]
    host = "127.0.0.1"
    port = 50051

    [rewards.jpeg_compressibility]          # served name; the type defaults to it
    max_batch_size = 64

    [rewards.small_jpegs]
    type = "jpeg_compressibility"
    max_image_size = [1024, 1024]
    options = {}                            # passed to the reward's constructor

Every key is checked: an unknown key is an error that lists the known ones.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from reward_server.batching import BatchingConfig
from reward_server.rewards import REWARD_TYPES

MiB = 1 << 20


class ConfigError(ValueError):
    """A configuration file or flag that cannot be used, with the reason and the fix."""


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """One served reward."""

    name: str
    """Name clients use in requests."""
    type: str
    """Reward type from the registry (``reward_server.rewards.REWARD_TYPES``)."""
    batching: BatchingConfig = dataclasses.field(default_factory=BatchingConfig)
    max_image_size: tuple[int, int] | None = None
    """Tighter (height, width) limit than the reward's own; None keeps the reward's."""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments for the reward's constructor."""


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Interface to bind. Loopback by default; use 0.0.0.0 (and TLS) to serve other machines."""
    port: int = 50051
    """0 picks a free port, which is printed."""
    metrics_port: int | None = None
    """Prometheus /metrics port on ``host``; None disables it, 0 picks a free one."""
    max_message_mb: int = 256
    """Largest request or response: 256 MiB holds a batch of 320 images of 512x512x3 uint8."""
    max_concurrent_rpcs: int = 256
    """RPCs in progress (streams included); more are refused with RESOURCE_EXHAUSTED."""
    grace_s: float = 30.0
    """On SIGTERM/SIGINT, how long in-flight RPCs may take to finish."""
    tls_cert: Path | None = None
    """PEM certificate chain; with ``tls_key`` the server speaks TLS only."""
    tls_key: Path | None = None
    auth_token_file: Path | None = None
    """File holding a bearer token that every RewardService call must send (``authorization: Bearer <token>``)."""
    rewards: tuple[RewardConfig, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.max_message_mb < 4:
            raise ConfigError(f"max_message_mb must be >= 4, got {self.max_message_mb}")
        if self.max_concurrent_rpcs < 1:
            raise ConfigError(f"max_concurrent_rpcs must be >= 1, got {self.max_concurrent_rpcs}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both, or neither")
        names = [r.name for r in self.rewards]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"reward name(s) configured twice: {', '.join(duplicates)}")


_SERVER_KEYS = {f.name for f in dataclasses.fields(ServerConfig)} - {"rewards"}
_BATCHING_KEYS = {f.name for f in dataclasses.fields(BatchingConfig)}
_REWARD_KEYS = {"type", "options", "max_image_size"} | _BATCHING_KEYS


# What a TOML/YAML value may be for each annotated type (paths are written as strings).
_ACCEPTED_VALUES: dict[Any, tuple[type, ...]] = {
    int: (int,),
    float: (int, float),
    str: (str,),
    bool: (bool,),
    Path: (str,),
    type(None): (type(None),),
}


def _check_types(section: str, values: Mapping[str, Any], cls: type) -> None:
    """Reject values whose type does not match the dataclass field, naming the key."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        hint = hints[key]
        accepted = tuple(t for arg in (typing.get_args(hint) or (hint,)) for t in _ACCEPTED_VALUES.get(arg, (object,)))
        if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
            names = " or ".join(sorted({"null" if t is type(None) else t.__name__ for t in accepted}))
            raise ConfigError(f"{section} {key} must be {names}, got {type(value).__name__} {value!r}")


def _reject_unknown(section: str, given: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")


def _reward_config(name: str, table: Any) -> RewardConfig:
    section = f"[rewards.{name}]"
    if table is None:
        table = {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{section} must be a table of settings, got {type(table).__name__}")
    _reject_unknown(section, table, _REWARD_KEYS)
    reward_type = table.get("type", name)
    if reward_type not in REWARD_TYPES:
        raise ConfigError(
            f"{section}: unknown reward type {reward_type!r}; known types: "
            f"{', '.join(sorted(REWARD_TYPES))} (set `type = ...` when the name differs)"
        )
    options = table.get("options", {})
    if not isinstance(options, Mapping):
        raise ConfigError(f"{section}.options must be a table, got {type(options).__name__}")
    max_image_size = table.get("max_image_size")
    if max_image_size is not None:
        if (
            not isinstance(max_image_size, list | tuple)
            or len(max_image_size) != 2
            or not all(isinstance(v, int) and v > 0 for v in max_image_size)
        ):
            raise ConfigError(f"{section}.max_image_size must be [height, width] in pixels, got {max_image_size!r}")
        max_image_size = (max_image_size[0], max_image_size[1])
    batching_values = {k: v for k, v in table.items() if k in _BATCHING_KEYS}
    _check_types(section, batching_values, BatchingConfig)
    try:
        batching = BatchingConfig(**batching_values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{section}: {error}") from None
    return RewardConfig(
        name=name, type=reward_type, batching=batching, max_image_size=max_image_size, options=dict(options)
    )


def parse_config(data: Mapping[str, Any], source: str = "config") -> ServerConfig:
    """Build a ServerConfig from parsed TOML/YAML."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a table at the top level, got {type(data).__name__}")
    _reject_unknown(source, data, {"server", "rewards"})
    server = data.get("server") or {}
    rewards = data.get("rewards") or {}
    if not isinstance(server, Mapping) or not isinstance(rewards, Mapping):
        raise ConfigError(f"{source}: [server] and [rewards] must be tables")
    _reject_unknown(f"{source} [server]", server, _SERVER_KEYS)
    _check_types(f"{source} [server]", server, ServerConfig)
    paths = {k: Path(v) for k, v in server.items() if k in ("tls_cert", "tls_key", "auth_token_file")}
    try:
        return ServerConfig(
            **{**server, **paths}, rewards=tuple(_reward_config(str(name), table) for name, table in rewards.items())
        )
    except TypeError as error:
        raise ConfigError(f"{source}: {error}") from None


def load_config(path: Path) -> ServerConfig:
    """Read a .toml, .yaml or .yml server configuration."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"config file {path} must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot parse config file {path}: {error}") from None
    return parse_config(data or {}, source=str(path))
