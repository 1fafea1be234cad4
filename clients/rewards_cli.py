"""``ddpo rewards``: the rewards a server offers, one line each: name, units, direction, state and description.

    ddpo rewards --server 127.0.0.1:50051
    ddpo rewards --server grpcs://rewards.example.org:443 --auth-token-file token.txt --root-certificates ca.pem

The state is "serving"; why the server could not load the reward (e.g. "failed to load: OSError: ..."); or "not
serving: <why>" (a reward still loading, or a remote endpoint that is down). With several replicas it is "serving on
K of N replicas" when only some serve it.

Exit status: 0 when the rewards were listed, 2 for bad usage, 3 when the server could not be used (the reason is
printed).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
from collections.abc import Sequence

from clients.cli_support import EXIT_OK, EXIT_SERVICE, Service, add_service_arguments
from clients.errors import RewardServiceError
from clients.replicas import ReplicaSet
from clients.types import RewardInfo

COLUMNS = ("NAME", "UNITS", "DIRECTION", "STATE", "DESCRIPTION")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpo rewards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_service_arguments(parser)
    return parser


def reward_state(client: ReplicaSet, info: RewardInfo) -> str:
    """What the listing and each replica's ``reward/<name>`` health say about ``info`` now."""
    if info.load_error:
        return info.load_error
    reasons = client.probe(info.name)
    serving = sum(reason is None for reason in reasons.values())
    if serving == len(reasons):
        return "serving"
    if serving:
        return f"serving on {serving} of {len(reasons)} replicas"
    return f"not serving: {next(iter(reasons.values()))}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    service = Service.from_args(parser, args)
    try:
        with service.open() as client:
            rewards = client.list_rewards()
            with concurrent.futures.ThreadPoolExecutor(max(1, len(rewards))) as pool:  # a health probe can wait 2 s
                states = list(pool.map(lambda info: reward_state(client, info), rewards))
    except RewardServiceError as error:
        print(f"ddpo rewards: reward service at {service.server}: {error}", file=sys.stderr)
        return EXIT_SERVICE
    print("\t".join(COLUMNS))
    for info, state in zip(rewards, states, strict=True):
        direction = "higher is better" if info.higher_is_better else "lower is better"
        print("\t".join((info.name, info.units or "-", direction, state, info.description)))
    return EXIT_OK
