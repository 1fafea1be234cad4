"""``ddpo score``: score image files (PNG or JPEG) with a reward server.

Exit status: 0 when every file was scored, 1 when any file failed (each failure is printed), 2 for bad usage,
3 when the server could not be used at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from clients.connect import check_address, open_client
from clients.errors import RewardServiceError
from clients.types import EncodedImage, ItemResult

EXIT_OK, EXIT_ITEMS_FAILED, EXIT_USAGE, EXIT_SERVICE = 0, 1, 2, 3
_MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpo score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="PNG or JPEG images")
    parser.add_argument(
        "--server", default="127.0.0.1:50051", help="HOST:PORT, grpc://HOST:PORT, grpcs://... or triton://HOST:PORT"
    )
    parser.add_argument("--reward", required=True, help="reward name (see the server's ListRewards)")
    parser.add_argument("--prompt", help="prompt sent with every image (for rewards that need one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of the call in seconds")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--root-certificates", type=Path, help="PEM file of trusted roots (with --tls)")
    parser.add_argument("--auth-token-file", type=Path, help="file holding the server's bearer token")
    return parser


def read_image_file(path: Path) -> EncodedImage:
    """Read a PNG or JPEG file as is; raise ValueError for anything else."""
    data = path.read_bytes()
    for magic, kind in _MAGIC.items():
        if data.startswith(magic):
            return EncodedImage(data, kind)  # type: ignore[arg-type]
    raise ValueError("not a PNG or JPEG file")


def _print(file: Path, reward: str, result: ItemResult | None, error: str | None, as_json: bool) -> None:
    if as_json:
        entry: dict[str, object] = {"file": str(file), "reward": reward}
        if result is not None and result.ok:
            entry["score"] = result.score
            if result.components:
                entry["components"] = result.components
            if result.info:
                entry["info"] = result.info
        else:
            entry["error"] = error if error is not None else f"{result.code.name}: {result.message}"  # type: ignore[union-attr]
        print(json.dumps(entry), flush=True)
    elif result is not None and result.ok:
        print(f"{file}\t{reward}\t{result.score:.6g}", flush=True)
    else:
        reason = error if error is not None else f"{result.code.name}: {result.message}"  # type: ignore[union-attr]
        print(f"{file}\t{reward}\terror: {reason}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        token = args.auth_token_file.read_text().strip() if args.auth_token_file else None
        check_address(args.server)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    images: dict[Path, EncodedImage] = {}
    read_errors: dict[Path, str] = {}
    for path in args.files:
        try:
            images[path] = read_image_file(path)
        except (OSError, ValueError) as error:
            read_errors[path] = f"cannot read {path}: {getattr(error, 'strerror', None) or error}"
    results: dict[Path, ItemResult] = {}
    if images:
        try:
            with open_client(
                args.server,
                timeout=args.timeout,
                tls=args.tls or None,
                root_certificates=args.root_certificates,
                auth_token=token,
            ) as client:
                batch = client.score(
                    args.reward,
                    list(images.values()),
                    prompts=[args.prompt] * len(images) if args.prompt is not None else None,
                )
        except RewardServiceError as error:
            print(f"ddpo score: {error}", file=sys.stderr)
            return EXIT_SERVICE
        results = dict(zip(images, batch.items, strict=True))
    for path in args.files:
        _print(path, args.reward, results.get(path), read_errors.get(path), args.json)
    failed = len(read_errors) + sum(not r.ok for r in results.values())
    return EXIT_ITEMS_FAILED if failed else EXIT_OK
