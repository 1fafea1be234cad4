"""``ddpo train`` (also ``python -m trainer``): DDPO against a running reward service.

ddpo serve &                                                   # the reward service, in its own process
ddpo train --config tiny --reward-server 127.0.0.1:50051 --reward jpeg_compressibility train.learning_rate=1e-3
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from clients.cli_support import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from clients.replicas import ADDRESS_FORMS
from trainer.config import ConfigError, load_config, preset_names

EXAMPLES = """\
examples:
  ddpo train --config tiny --reward-server 127.0.0.1:50051 --reward jpeg_compressibility --epochs 5
  ddpo train --config compressibility --reward-server 127.0.0.1:50051 --run-dir runs/compress train.learning_rate=3e-4
  ddpo train --config tiny --reward-server 127.0.0.1:50051 --run-dir runs/tiny --resume latest

Any config key can be set as key=value, e.g. train.algorithm=rwr sample.num_steps=20. Run under
`accelerate launch -m trainer` or `torchrun -m trainer` for several processes or GPUs (docs/gpu.md).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpo train",
        description="Fine-tune a Stable-Diffusion-style model with DDPO, getting rewards from a reward server.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help=f"a preset ({', '.join(preset_names())}) or a .toml/.yaml file")
    parser.add_argument(
        "--reward-server",
        help=f"reward service address: {ADDRESS_FORMS}",
    )
    parser.add_argument("--reward", help="reward to maximise, as the service lists it")
    parser.add_argument("--model", help="hub id, local folder, or 'tiny'")
    parser.add_argument("--run-dir", help="output folder (metrics.jsonl, tensorboard/, images/, checkpoints/, final/)")
    parser.add_argument("--epochs", type=int, help="train until this many epochs are done (num_epochs)")
    parser.add_argument("--resume", help="a checkpoint folder, or 'latest' in the run folder")
    parser.add_argument(
        "--overwrite", action="store_true", help="start over in a run folder that holds a run (deletes its files)"
    )
    parser.add_argument("--on-reward-error", choices=["fail", "drop"], help="fail the epoch (default) or drop the item")
    parser.add_argument(
        "--auth-token-file", help="file with the bearer token the reward service requires (reward.token_file)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """Flags become key=value overrides, applied after the positional ones."""
    flags = {
        "reward.server": args.reward_server,
        "reward.name": args.reward,
        "model": args.model,
        "run_dir": args.run_dir,
        "num_epochs": args.epochs,
        "reward.on_error": args.on_reward_error,
        "reward.token_file": args.auth_token_file,
    }
    return [
        f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
        for key, value in flags.items()
        if value is not None
    ]


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues this run from its latest checkpoint."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume=") and arg != "--overwrite":
            args.append(arg)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["accelerate", "launch", "--num_processes", str(processes), "-m", "trainer"] if processes > 1 else []
    return shlex.join([*(launcher or ["ddpo", "train"]), *args, "--resume", "latest"])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come before and after the flags
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        config = load_config(args.config, [*args.overrides, *_flag_overrides(args)])
        config.reward.read_token()  # a missing or empty token file is a usage error, found before anything loads
    except ConfigError as error:
        parser.error(str(error))
    # Before torch and diffusers load (seconds): the run folder, and whether the service offers the reward.
    from trainer.lifecycle import RunFolderInUseError, StopRequested, check_run_dir
    from trainer.rewards import RewardError, connect

    r = config.reward
    try:
        check_run_dir(Path(config.run_dir), args.resume, args.overwrite)
        client = connect(r.server, r.name, r.read_token(), r.ca_file, r.timeout, r.outage_timeout)
    except RunFolderInUseError as error:
        print(f"ddpo train: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RewardError as error:
        print(f"ddpo train: {error}", file=sys.stderr)
        return EXIT_FAILED

    from trainer.checkpoint import list_checkpoints
    from trainer.train import STOPS, Trainer

    try:
        final = Trainer(config, args.resume, args.overwrite, client).run()
    except KeyboardInterrupt:  # Ctrl-C before training started (during training it stops at a safe point)
        print("ddpo train: interrupted before training started; nothing was saved", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (*STOPS, ValueError) as error:
        print(f"ddpo train: {error}", file=sys.stderr)
        if isinstance(error, STOPS) and (found := list_checkpoints(Path(config.run_dir))):
            print(
                f"ddpo train: the last checkpoint is {found[-1]}; continue with:\n  {resume_command(argv)}",
                file=sys.stderr,
            )
        return error.exit_code if isinstance(error, StopRequested) else EXIT_FAILED
    print(f"ddpo train: done; final weights in {final}")
    return EXIT_OK
