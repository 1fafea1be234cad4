"""The ``ddpo`` command. Subcommands import their own modules, so ``ddpo score`` needs only the light client."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Sequence

from clients.cli_support import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, missing_extra

# subcommand -> (module with main(argv), extra that provides it, summary)
COMMANDS = {
    "serve": ("reward_server.cli", "server", "run the gRPC reward server"),
    "rewards": ("clients.rewards_cli", "client", "list the rewards a server offers, with their state"),
    "score": ("clients.score_cli", "client", "score image files with a reward server"),
    "train": ("trainer.cli", "trainer", "fine-tune a diffusion model with DDPO against a reward server"),
    "eval": ("trainer.eval_cli", "trainer", "sample a model with fixed seeds and score it with the reward service"),
    "admin": ("clients.admin_cli", "client", "register, unregister and list a reward server's remote endpoints"),
    "triton": ("reward_server.triton.cli", "server", "export the rewards as a Triton model repository, or serve one"),
}


def package_version() -> str:
    """The installed distribution's version, or a note saying that this copy is not installed."""
    try:
        return importlib.metadata.version("ddpo")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed; `pip install -e .` in the repository installs it)"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-V", "--version"):
        print(f"ddpo {package_version()}")
        return EXIT_OK
    if not args or args[0] in ("-h", "--help"):
        print("usage: ddpo <command> [options]\n       ddpo --version\n\ncommands:")
        for name, (_, _, summary) in COMMANDS.items():
            print(f"  {name:<8} {summary}")
        print("\n`ddpo <command> --help` describes each command.")
        return EXIT_OK if args else EXIT_USAGE
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"ddpo: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    module_name, extra, _ = COMMANDS[command]
    try:  # a missing extra shows up when the command's module is imported, or later, when it imports what it needs
        result: int = importlib.import_module(module_name).main(rest)
    except ModuleNotFoundError as error:
        message = missing_extra(error, f"ddpo {command}", extra)
        if message is None:  # not a module an extra brings: a bug, or a plugin's own dependency
            raise
        print(message, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C where a command has no stop of its own (train and serve have theirs)
        print(f"ddpo {command}: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return result


if __name__ == "__main__":
    sys.exit(main())
