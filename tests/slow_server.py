"""A reward server whose only reward sleeps per batch, run exactly as `ddpo serve` runs (for shutdown and fault tests).

python -m tests.slow_server [--port P]              # "slow": mean pixel after 2 s per batch
python -m tests.slow_server --jpeg --delay 1.5      # jpeg_compressibility (deterministic) after 1.5 s per batch,
                                                    # printing "scoring N" to stdout as each batch starts
"""

import argparse
import asyncio

from reward_server.batching import BatchingConfig
from reward_server.cli import _announce
from reward_server.config import ServerConfig
from reward_server.logs import configure_logging
from reward_server.rewards import Reward
from reward_server.server import serve
from tests.support import DelayedJpeg, SlowReward

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--jpeg", action="store_true")
parser.add_argument("--delay", type=float, default=2.0)
args = parser.parse_args()
configure_logging("info", "json")
reward: Reward = DelayedJpeg(args.delay, announce=True) if args.jpeg else SlowReward(delay=args.delay)
# one batch at a time, never more than a sampling batch of 8: the fault tests count batches as they start
batching = BatchingConfig(max_batch_size=8, instances=1) if args.jpeg else BatchingConfig()
asyncio.run(serve(ServerConfig(port=args.port, grace_s=15), [(reward, batching)], on_started=_announce))
