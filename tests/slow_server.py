"""A reward server whose only reward sleeps 2 s per batch, run exactly as `ddpo serve` runs (for shutdown tests)."""

import argparse
import asyncio

from reward_server.batching import BatchingConfig
from reward_server.cli import _announce
from reward_server.config import ServerConfig
from reward_server.logs import configure_logging
from reward_server.server import serve
from tests.support import SlowReward

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, default=0)
args = parser.parse_args()
configure_logging("info", "json")
asyncio.run(
    serve(ServerConfig(port=args.port, grace_s=15), [(SlowReward(delay=2.0), BatchingConfig())], on_started=_announce)
)
