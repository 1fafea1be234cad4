"""``ddpo triton export`` (write a model repository) and ``ddpo triton serve`` (run tritonserver on one)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from clients.cli_support import EXIT_FAILED, EXIT_OK
from reward_server.cli import add_reward_arguments, read_config
from reward_server.config import ConfigError
from reward_server.ports import check_free
from reward_server.triton.export import export_repository, repository_differences
from reward_server.triton.launch import tritonserver_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpo triton", description="Deploy the rewards on Triton Inference Server.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export",
        help="write a Triton model repository, one model per reward",
        description="Write a Triton model repository with one Python-backend model per reward (the rewards of "
        "--config, or --rewards with default settings), for `ddpo triton serve` or any tritonserver. Composites and "
        "remote endpoints are refused: `ddpo serve` computes them. With --check, write nothing and exit 1 if --out "
        "differs from what the export would write.",
    )
    add_reward_arguments(export, "export")
    export.add_argument("--out", type=Path, required=True, help="model repository folder")
    export.add_argument("--check", action="store_true", help="write nothing; exit 1 if --out differs from the export")
    serve = commands.add_parser(
        "serve",
        help="run tritonserver (system or bundled) on a model repository",
        description="Run tritonserver on a model repository written by `ddpo triton export`: a system one (on PATH, or "
        "the NGC image's /opt/tritonserver), else the one bundled with nvidia-pytriton (the triton extra). Clients "
        "reach it at triton://HOST:GRPC_PORT. SIGTERM and SIGINT are passed on to it; its exit status is this "
        "command's.",
    )
    serve.add_argument("--model-repository", type=Path, required=True)
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("tritonserver_args", nargs="*", help="more tritonserver flags, after --")
    return parser


def _export(args: argparse.Namespace) -> int:
    rewards = read_config(args).rewards
    if args.check:
        problems = repository_differences(rewards, args.out)
        for problem in problems:
            print(f"ddpo triton export --check: {args.out}: {problem}", file=sys.stderr)
        if problems:
            print("re-run the export without --check to update it", file=sys.stderr)
        return EXIT_FAILED if problems else EXIT_OK
    for path in export_repository(rewards, args.out):
        print(f"wrote {path}")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    for flag in ("grpc_port", "http_port", "metrics_port"):
        if not 0 < getattr(args, flag) < 65536:
            raise ConfigError(f"--{flag.replace('_', '-')} must be in 1..65535, got {getattr(args, flag)}")
        check_free(args.host, getattr(args, flag), f"Triton's {flag.replace('_', ' ')}")
    with tempfile.TemporaryDirectory(prefix="ddpo-triton-") as workdir:
        command = tritonserver_command(
            args.model_repository,
            Path(workdir),
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            host=args.host,
            extra_args=tuple(args.tritonserver_args),
        )
        print(f"ddpo triton serve: {' '.join(command.argv)}", flush=True)
        process = subprocess.Popen(command.argv, env=command.env)

        def forward(signum: int, frame: FrameType | None) -> None:
            process.send_signal(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, forward)
        return process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _export(args) if args.command == "export" else _serve(args)
    except ConfigError as error:
        parser.error(str(error))
    except (ValueError, RuntimeError, OSError) as error:
        print(f"ddpo triton {args.command}: {error}", file=sys.stderr)
        return EXIT_FAILED
