"""The ``ddpo`` command. Subcommands import their own modules, so ``ddpo score`` needs only the light client."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module with main(argv), extra that provides it, summary)
COMMANDS = {
    "serve": ("reward_server.cli", "server", "run the gRPC reward server"),
    "score": ("clients.score_cli", "client", "score image files with a reward server"),
    "train": ("trainer.cli", "trainer", "fine-tune a diffusion model with DDPO against a reward server"),
    "eval": ("trainer.eval_cli", "trainer", "sample a model with fixed seeds and score it with the reward service"),
    "admin": ("clients.admin_cli", "client", "register, unregister and list a reward server's remote endpoints"),
    "triton": ("reward_server.triton.cli", "server", "export the rewards as a Triton model repository, or serve one"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: ddpo <command> [options]\n\ncommands:")
        for name, (_, _, summary) in COMMANDS.items():
            print(f"  {name:<8} {summary}")
        print("\n`ddpo <command> --help` describes each command.")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"ddpo: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, extra, _ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        print(
            f"ddpo {command}: missing dependency ({error}); install it with `pip install 'ddpo[{extra}]'`",
            file=sys.stderr,
        )
        return 2
    result: int = module.main(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
