"""``ddpo train`` (also ``python -m trainer``): DDPO against a running reward service.

ddpo serve &                                                   # the reward service, in its own process
ddpo train --config tiny --reward-server 127.0.0.1:50051 --reward jpeg_compressibility train.learning_rate=1e-3
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from trainer.config import ConfigError, load_config, preset_names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpo train",
        description="Fine-tune a Stable-Diffusion-style model with DDPO, getting rewards from a reward server.",
        epilog="Any config key can be set as key=value, e.g. train.algorithm=rwr sample.num_steps=20. "
        "Run under `accelerate launch -m trainer` or `torchrun -m trainer` for several processes or GPUs "
        "(docs/gpu.md).",
    )
    parser.add_argument("--config", required=True, help=f"a preset ({', '.join(preset_names())}) or a .toml/.yaml file")
    parser.add_argument(
        "--reward-server",
        help="reward service address: host:port, grpc(s)://host:port, or triton://host:port (Triton gRPC)",
    )
    parser.add_argument("--reward", help="reward to maximise, as the service lists it")
    parser.add_argument("--model", help="hub id, local folder, or 'tiny'")
    parser.add_argument("--run-dir", help="output folder (metrics.jsonl, tensorboard/, images/, checkpoints/, final/)")
    parser.add_argument("--epochs", type=int, help="train until this many epochs are done (num_epochs)")
    parser.add_argument("--resume", help="a checkpoint folder, or 'latest' in the run folder")
    parser.add_argument("--on-reward-error", choices=["fail", "drop"], help="fail the epoch (default) or drop the item")
    parser.add_argument("--auth-token-file", help="file with the bearer token the reward service requires")
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
    }
    overrides = [
        f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
        for key, value in flags.items()
        if value is not None
    ]
    if args.auth_token_file:
        try:
            with open(args.auth_token_file, encoding="utf-8") as file:
                token = file.read().strip()
        except OSError as error:
            raise ConfigError(f"--auth-token-file: {error}") from None
        overrides.append(f"reward.token={token!r}")
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        config = load_config(args.config, [*args.overrides, *_flag_overrides(args)])
    except ConfigError as error:
        parser.error(str(error))
    # torch and diffusers load only once the config is valid
    from trainer.distributed import ProcessFailedError
    from trainer.precision import NonFiniteError
    from trainer.rewards import RewardError
    from trainer.train import RatioCheckError, train

    try:
        final = train(config, resume=args.resume)
    except (RewardError, RatioCheckError, NonFiniteError, ProcessFailedError, ValueError) as error:
        print(f"ddpo train: {error}", file=sys.stderr)
        return 1
    print(f"ddpo train: done; final weights in {final}")
    return 0
