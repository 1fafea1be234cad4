"""What every ``ddpo`` command shares: exit codes, reading a token file, the message for a missing extra, and the
flags that reach a reward service. Base dependencies only (grpcio, protobuf, numpy), so any command can import it.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from clients.connect import check_address, open_client
from clients.replicas import ADDRESS_FORMS, ReplicaSet

EXIT_OK = 0
EXIT_FAILED = 1
"""The command ran but did not fully succeed: some items failed (score, eval), or the run or the server stopped with
an error (train, serve, triton)."""
EXIT_USAGE = 2
"""Bad usage (argparse's own code): a flag, file or address that cannot work, or a missing extra."""
EXIT_SERVICE = 3
"""The reward service could not be used at all."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT), as a shell reports it: 128 + 2."""

# The extras of pyproject.toml that bring each third-party module the commands import, the likeliest first.
_EXTRAS_OF_MODULE: dict[str, tuple[str, ...]] = {
    "grpc_reflection": ("server",),
    "prometheus_client": ("server",),
    "yaml": ("server",),
    "PIL": ("server", "trainer", "triton"),
    "torch": ("rewards", "trainer"),  # the server needs it for model rewards; train and eval name their own extra
    "transformers": ("rewards", "trainer"),
    "safetensors": ("rewards", "trainer"),
    "diffusers": ("trainer",),
    "accelerate": ("trainer",),
    "peft": ("trainer",),
    "tqdm": ("trainer",),
    "tensorboard": ("trainer",),
    "matplotlib": ("trainer",),
    "bert_score": ("rewards",),
    "tritonclient": ("triton",),
    "pytriton": ("triton",),
}


def missing_extra(error: ModuleNotFoundError, who: str, preferred: str) -> str | None:
    """What to tell the user of ``who`` (e.g. "ddpo serve") when ``error`` is about a module an extra brings: install
    ``preferred`` if that extra brings it, else the first one that does. None for a module that no extra brings (a
    bug, or a plugin's own dependency)."""
    module = (error.name or "").partition(".")[0]
    extras = _EXTRAS_OF_MODULE.get(module, ())
    if not extras:
        return None
    return missing_extra_message(who, module, preferred if preferred in extras else extras[0])


def missing_extra_message(who: str, module: str, extra: str) -> str:
    """The one way every command and the library say that an extra is missing."""
    return f"{who} needs the {extra!r} extra ({module!r} is not installed): pip install 'ddpo[{extra}]'"


def read_token_file(path: str | Path, source: str) -> str:
    """The bearer token held in ``path`` (surrounding whitespace stripped). ValueError, naming ``source`` (the flag or
    setting that gave the path) and the file, when it is missing, unreadable, not UTF-8 text or empty."""
    where = f"{source} {str(path)!r}"
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as error:
        reason = error.strerror or error
        raise ValueError(f"{where}: cannot read it ({reason}); it must be a file holding the token") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not UTF-8 text; it must hold the bearer token") from None
    if not token:
        raise ValueError(f"{where} is empty; it must hold the bearer token")
    return token


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """--server, --timeout, --tls, --root-certificates and --auth-token-file: how to reach a reward service."""
    parser.add_argument("--server", default="127.0.0.1:50051", help=ADDRESS_FORMS)
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of each call in seconds")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--root-certificates", type=Path, help="PEM file of trusted roots (with --tls)")
    parser.add_argument("--auth-token-file", type=Path, help="file holding the server's bearer token")


@dataclasses.dataclass(frozen=True)
class Service:
    """A reward service as the flags of ``add_service_arguments`` give it, checked."""

    server: str
    timeout: float
    tls: bool | None
    root_certificates: Path | None
    token: str | None

    @classmethod
    def from_args(cls, parser: argparse.ArgumentParser, args: argparse.Namespace) -> Service:
        """The checked flags; ``parser.error`` (exit 2) for a malformed address or a bad token file."""
        try:
            check_address(args.server)
            token = read_token_file(args.auth_token_file, "--auth-token-file") if args.auth_token_file else None
        except ValueError as error:
            parser.error(str(error))
        return cls(args.server, args.timeout, args.tls or None, args.root_certificates, token)

    def open(self) -> ReplicaSet:
        return open_client(
            self.server,
            timeout=self.timeout,
            tls=self.tls,
            root_certificates=self.root_certificates,
            auth_token=self.token,
        )
