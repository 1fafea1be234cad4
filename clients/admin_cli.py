"""``ddpo admin``: register, unregister and list a reward server's remote endpoints at runtime.

    ddpo admin --server 127.0.0.1:50051 --admin-token-file admin.token register judge grpc://10.0.0.5:50051/aesthetic \\
        --option timeout_s=20 --option max_batch_size=16
    ddpo admin --server 127.0.0.1:50051 --admin-token-file admin.token list
    ddpo admin --server 127.0.0.1:50051 --admin-token-file admin.token unregister judge

Exit status: 0 on success, 2 for bad usage, 3 when the server refused or could not be reached (the reason is printed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clients.admin import AdminClient
from clients.cli_support import EXIT_OK, EXIT_SERVICE, read_token_file
from clients.connect import check_address
from clients.errors import RewardServiceError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpo admin", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT, grpc://HOST:PORT or grpcs://...")
    parser.add_argument("--admin-token-file", type=Path, required=True, help="file holding the server's admin token")
    parser.add_argument("--root-certificates", type=Path, help="PEM file of trusted roots (grpcs://)")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of the call in seconds")
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser("register", help="serve a remote endpoint under a name")
    register.add_argument("name", help="the name clients will use")
    register.add_argument("url", help="grpc://HOST:PORT/REWARD, triton://HOST:PORT/MODEL or http(s)://HOST/PATH")
    register.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the remote reward or its batching (VALUE is JSON, else a string); repeatable",
    )
    register.add_argument("--replace", action="store_true", help="replace an endpoint registered under this name")
    unregister = commands.add_parser("unregister", help="stop serving an endpoint registered at runtime")
    unregister.add_argument("name")
    commands.add_parser("list", help="every reward, where it comes from, and its state")
    return parser


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE is read as JSON (numbers, true, lists...) and otherwise kept as a string."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {pair!r} must look like KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_address(args.server)
        token = read_token_file(args.admin_token_file, "--admin-token-file")
        options = parse_options(args.option) if args.command == "register" else {}
        client = AdminClient(
            args.server, admin_token=token, timeout=args.timeout, root_certificates=args.root_certificates
        )
    except (OSError, ValueError) as error:
        parser.error(str(error))
    try:
        with client:
            if args.command == "register":
                info = client.register_endpoint(args.name, args.url, options, replace=args.replace)
                print(
                    f"registered {info.name}: {info.description} ({'needs' if info.requires_prompt else 'no'} prompt)"
                )
            elif args.command == "unregister":
                client.unregister_endpoint(args.name)
                print(f"unregistered {args.name}")
            else:
                for entry in client.list_rewards_admin():
                    where = f" {entry.url}" if entry.url else ""
                    runtime = " (runtime)" if entry.runtime else ""
                    print(f"{entry.info.name}\t{entry.source}:{entry.type}{where}{runtime}\t{entry.state}")
    except RewardServiceError as error:
        print(f"ddpo admin: {error}", file=sys.stderr)
        return EXIT_SERVICE
    return EXIT_OK
