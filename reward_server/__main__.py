"""``python -m reward_server``: the same as ``ddpo serve``."""

import sys

from reward_server.cli import main

sys.exit(main())
