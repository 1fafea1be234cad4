"""Server configuration: a TOML or YAML file, overridden by command-line flags.

    [server]
    host = "127.0.0.1"
    port = 50051
    plugins = ["my_rewards"]                # modules that register reward types (reward_server.plugins)

    [rewards.jpeg_compressibility]          # served name; the type defaults to it
    max_batch_size = 64

    [rewards.small_jpegs]
    type = "jpeg_compressibility"
    max_image_size = [1024, 1024]
    options = {}                            # passed to the reward's constructor

    [rewards.judge]                         # a reward served by another endpoint (reward_server.rewards.remote)
    type = "remote"
    options = { url = "grpc://10.0.0.5:50051/aesthetic", timeout_s = 30 }

    [rewards.both]                          # a weighted sum of other served rewards (reward_server.composite)
    type = "composite"
    weights = { jpeg_compressibility = 1.0, judge = 0.5 }

Every key is checked (``clients.typed_config``): an unknown key is an error that lists the known ones and suggests
the one meant, where one is close.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from clients.typed_config import ConfigError as ConfigError  # re-exported: callers catch reward_server's ConfigError
from clients.typed_config import (
    UnknownKeyError,
    WrongTypeError,
    check_fields,
    config_format,
    parse_config_text,
    reject_unknown,
)
from reward_server.batching import BatchingConfig
from reward_server.composite import COMPOSITE, check_weights
from reward_server.plugins import PluginError, load_plugin, reward_types

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """One served reward."""

    name: str
    """Name clients use in requests."""
    type: str
    """Reward type: built-in, from a plugin, or from an installed package (``reward_server.plugins``)."""
    batching: BatchingConfig = dataclasses.field(default_factory=BatchingConfig)
    max_image_size: tuple[int, int] | None = None
    """Tighter (height, width) limit than the reward's own; None keeps the reward's."""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments for the reward's constructor."""
    weights: Mapping[str, float] | None = None
    """For type "composite" only: the served rewards it adds up, with their weights."""


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
    admin_token_file: Path | None = None
    """File holding the token RewardAdmin calls must send (``authorization: Bearer <token>``); None disables them."""
    endpoints_file: Path | None = None
    """JSON file where endpoints registered at runtime are saved, and read back at startup."""
    max_image_pixels: int | None = None
    """Largest encoded image, in pixels, read from its header before it is decoded; None: the largest image any
    served reward accepts (its max_image_size)."""
    max_request_decoded_mb: int = 512
    """Largest total size of the decoded images of one Score call or stream message; items beyond it get
    INVALID_ARGUMENT. Counted at 4 bytes a pixel for encoded images (RGBA, their largest), H×W×C for raw ones."""
    max_decoded_mb_in_flight: int = 2048
    """Decoded images the server holds across all calls while they wait to be scored; beyond it, decoding waits
    (back-pressure on the stream or call that brought them)."""
    health_interval_s: float = 5.0
    """How often the health of remote endpoints is checked and mirrored in this server's health service."""
    plugins: tuple[str, ...] = ()
    """Plugin modules, imported before the rewards are built (``load_plugins``)."""
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
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ConfigError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if not 1 <= self.max_request_decoded_mb <= self.max_decoded_mb_in_flight:
            raise ConfigError(
                f"max_request_decoded_mb ({self.max_request_decoded_mb}) must be >= 1 and at most "
                f"max_decoded_mb_in_flight ({self.max_decoded_mb_in_flight})"
            )
        if not 0.1 <= self.health_interval_s <= 3600:
            raise ConfigError(f"health_interval_s must be in [0.1, 3600], got {self.health_interval_s}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both, or neither")
        names = [r.name for r in self.rewards]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"reward name(s) configured twice: {', '.join(duplicates)}")
        rewards = {r.name: r for r in self.rewards if r.type != COMPOSITE}
        for composite in self.rewards:
            missing = [c for c in composite.weights or {} if c not in rewards]
            if missing:
                raise ConfigError(
                    f"composite {composite.name!r} adds up {', '.join(missing)}, which this server does not serve "
                    f"as plain rewards; serve them too (served: {', '.join(sorted(rewards)) or 'none'})"
                )


_SERVER_KEYS = {f.name for f in dataclasses.fields(ServerConfig)} - {"rewards"}
_LIST_KEYS = {"plugins"}
BATCHING_KEYS = {f.name for f in dataclasses.fields(BatchingConfig)}
_REWARD_KEYS = {"type", "options", "max_image_size"} | BATCHING_KEYS
_COMPOSITE_KEYS = {"type", "weights"}


def _check_fields(section: str, cls: type[Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """``typed_config.check_fields``, a wrong type worded as the server's errors are: "[server] port must be int, got
    str 'fast'"."""
    try:
        return check_fields(cls, values, prefix=f"{section} ")
    except WrongTypeError as error:
        got = f"{type(error.value).__name__} {error.value!r}"
        raise ConfigError(f"{error.key} must be {error.expected}, got {got}") from None


def _reject_unknown(section: str, given: Mapping[str, Any], known: Collection[str]) -> None:
    """``typed_config.reject_unknown`` worded as the server's errors are: every unknown key, then the known ones."""
    try:
        reject_unknown(given, known)
    except UnknownKeyError as error:
        raise ConfigError(
            f"{section}: unknown key(s) {', '.join(error.unknown)}; known keys: {', '.join(error.known)}"
            f"{error.did_you_mean}"
        ) from None


def reward_table(config: RewardConfig) -> dict[str, Any]:
    """The config-file table that ``reward_config`` reads back as ``config`` (settings left at defaults omitted), for
    a reward object's config (not a composite's)."""
    table: dict[str, Any] = {"type": config.type, "options": dict(config.options)}
    if config.max_image_size is not None:
        table["max_image_size"] = list(config.max_image_size)
    defaults = BatchingConfig()
    for key in BATCHING_KEYS:
        if getattr(config.batching, key) != getattr(defaults, key):
            table[key] = getattr(config.batching, key)
    return table


def reward_config(name: str, table: Any) -> RewardConfig:
    """One ``[rewards.NAME]`` table, checked."""
    section = f"[rewards.{name}]"
    if table is None:
        table = {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{section} must be a table of settings, got {type(table).__name__}")
    reward_type = table.get("type", name)
    if reward_type == COMPOSITE:
        _reject_unknown(f"{section} (a composite)", table, _COMPOSITE_KEYS)
        try:
            weights = check_weights(table.get("weights"), f"{section}.weights")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return RewardConfig(name=name, type=COMPOSITE, weights=weights)
    _reject_unknown(section, table, _REWARD_KEYS)
    if reward_type not in reward_types():
        raise ConfigError(
            f"{section}: unknown reward type {reward_type!r}; known types: "
            f"{', '.join(reward_types())} (set `type = ...` when the name differs, or load its plugin)"
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
    batching_values = _check_fields(section, BatchingConfig, {k: v for k, v in table.items() if k in BATCHING_KEYS})
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
    settings = _check_fields(
        f"{source} [server]", ServerConfig, {k: v for k, v in server.items() if k not in _LIST_KEYS}
    )
    plugins = server.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(module, str) for module in plugins):
        raise ConfigError(f"{source} [server] plugins must be a list of module names, got {plugins!r}")
    load_plugins(plugins, f"{source} [server] plugins")
    try:
        return ServerConfig(
            **settings,
            plugins=tuple(plugins),
            rewards=tuple(reward_config(str(name), table) for name, table in rewards.items()),
        )
    except TypeError as error:
        raise ConfigError(f"{source}: {error}") from None


def load_plugins(modules: Sequence[str], source: str) -> None:
    """Import plugin modules so that their reward types can be configured; ConfigError naming the broken one."""
    for module in modules:
        try:
            load_plugin(module)
        except PluginError as error:
            raise ConfigError(f"{source}: {error}") from None


def load_config(path: Path) -> ServerConfig:
    """Read a .toml, .yaml or .yml server configuration."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    form = config_format(path)
    if form is None:
        raise ConfigError(f"config file {path} must end in .toml, .yaml or .yml")
    try:
        data = parse_config_text(text, form)
    except ConfigError as error:
        raise ConfigError(f"cannot parse config file {path}: {error}") from None
    return parse_config(data, source=str(path))
