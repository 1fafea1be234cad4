"""``python -m reward_server``: the same as ``ddpo serve`` (a missing extra is one line, as there)."""

import sys

from clients.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
