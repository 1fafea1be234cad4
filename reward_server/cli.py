"""``ddpo serve``: run the reward server until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from clients.cli_support import EXIT_FAILED, EXIT_OK, read_token_file
from reward_server.config import ConfigError, RewardConfig, ServerConfig, load_config, load_plugins
from reward_server.logs import configure_logging
from reward_server.plugins import reward_types
from reward_server.server import RewardServer, serve

DEFAULT_REWARDS = ("jpeg_compressibility", "jpeg_incompressibility")
EXAMPLES = """\
examples:
  ddpo serve --rewards jpeg_compressibility,jpeg_incompressibility --port 50051 --metrics-port 9090
  ddpo serve --config rewards.toml --host 0.0.0.0 --auth-token-file /run/secrets/ddpo-token
  ddpo serve --frontend pytriton --config rewards.toml --port 8001 --http-port 8000
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpo serve",
        description="Serve rewards over gRPC (ddpo.reward.v1.RewardService).",
        epilog=f"{EXAMPLES}\n"
        + textwrap.fill(f"Reward types: {', '.join(reward_types())} (and those of --plugin modules).", 100)
        + "\nFlags override the config file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_reward_arguments(parser, "serve")
    parser.add_argument("--host", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, help="port (default 50051; 0 picks a free one and prints it)")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0: a free one)")
    parser.add_argument("--max-message-mb", type=int, help="largest request/response in MiB (default 256)")
    parser.add_argument("--max-concurrent-rpcs", type=int, help="RPCs in progress before RESOURCE_EXHAUSTED")
    parser.add_argument("--grace", type=float, dest="grace_s", help="seconds in-flight RPCs get at shutdown")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key: TLS only)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key")
    parser.add_argument("--auth-token-file", type=Path, help="require `authorization: Bearer <token in file>`")
    parser.add_argument(
        "--admin-token-file", type=Path, help="enable the RewardAdmin RPCs (runtime endpoints) with this token"
    )
    parser.add_argument("--endpoints-file", type=Path, help="JSON file that keeps runtime endpoints across restarts")
    parser.add_argument(
        "--frontend",
        choices=["grpc", "pytriton"],
        default="grpc",
        help="grpc: the ddpo RewardService (default); pytriton: the same rewards as Triton models, bound with "
        "PyTriton (KServe v2; clients use triton://HOST:PORT; needs the triton extra)",
    )
    parser.add_argument("--http-port", type=int, help="--frontend pytriton: Triton's HTTP port (default 8000)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="json", choices=["json", "text"])
    return parser


def add_reward_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """--rewards, --config and --plugin: which rewards, with which settings (``read_config``)."""
    parser.add_argument(
        "--rewards",
        help=f"comma-separated rewards to {verb}; each is configured in --config or "
        f"takes default settings (default: the config's rewards, else {','.join(DEFAULT_REWARDS)})",
    )
    parser.add_argument("--config", type=Path, help="TOML or YAML file with [server] and [rewards.NAME] tables")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import this module first; its reward types can then be served (repeatable; see docs/custom-rewards.md)",
    )


def read_config(args: argparse.Namespace) -> ServerConfig:
    """The config file (after the --plugin modules, which its rewards may use) with the --rewards selection."""
    load_plugins(args.plugin, "--plugin")
    config = load_config(args.config) if args.config else ServerConfig()
    plugins = tuple(dict.fromkeys([*args.plugin, *config.plugins]))
    return dataclasses.replace(config, plugins=plugins, rewards=select_rewards(config, args.rewards))


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    config = read_config(args)
    overrides = {
        name: getattr(args, name)
        for name in (
            "host",
            "port",
            "metrics_port",
            "max_message_mb",
            "max_concurrent_rpcs",
            "grace_s",
            "tls_cert",
            "tls_key",
            "auth_token_file",
            "admin_token_file",
            "endpoints_file",
        )
        if getattr(args, name) is not None
    }
    return dataclasses.replace(config, **overrides)


def select_rewards(config: ServerConfig, names_flag: str | None) -> tuple[RewardConfig, ...]:
    """The rewards ``--rewards`` names (each configured in ``config`` or by type with default settings), else the
    config's rewards, else the defaults."""
    if names_flag is None and config.rewards:
        return config.rewards
    names = [n.strip() for n in (names_flag or ",".join(DEFAULT_REWARDS)).split(",") if n.strip()]
    if not names:
        raise ConfigError("--rewards is empty; name at least one reward")
    configured = {r.name: r for r in config.rewards}
    types = reward_types()
    unknown = [n for n in names if n not in configured and n not in types]
    if unknown:
        raise ConfigError(
            f"--rewards: unknown reward(s) {', '.join(unknown)}; known types: "
            f"{', '.join(types)}" + (f"; configured: {', '.join(sorted(configured))}" if configured else "")
        )
    return tuple(configured.get(n) or RewardConfig(name=n, type=n) for n in names)


def _announce(server: RewardServer) -> None:
    print(
        f"ddpo reward server listening on {server.config.host}:{server.port} "
        f"(rewards, loading in the background: {', '.join(sorted(server.specs))})",
        flush=True,
    )
    if server.metrics_port is not None:
        print(f"metrics on http://{server.config.host}:{server.metrics_port}/metrics", flush=True)


def _announce_triton(config: ServerConfig, rewards: list[str]) -> None:
    print(
        f"ddpo reward server (PyTriton) listening on triton://{config.host}:{config.port} "
        f"(rewards: {', '.join(rewards)})",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        for key in ("auth_token_file", "admin_token_file"):  # a bad token file is bad usage, found before any loading
            if (path := getattr(config, key)) is not None:
                read_token_file(path, f"--{key.replace('_', '-')}" if getattr(args, key) else f"[server] {key}")
    except (ConfigError, ValueError) as error:
        parser.error(str(error))
    if args.http_port is not None and args.frontend != "pytriton":
        parser.error("--http-port is for --frontend pytriton")
    configure_logging(args.log_level, args.log_format)
    try:
        if args.frontend == "pytriton":
            from reward_server.triton.pytriton_frontend import serve_pytriton

            serve_pytriton(
                config, http_port=8000 if args.http_port is None else args.http_port, on_started=_announce_triton
            )
        else:
            asyncio.run(serve(config, on_started=_announce))
    except (ValueError, OSError, RuntimeError) as error:
        print(f"ddpo serve: {error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
