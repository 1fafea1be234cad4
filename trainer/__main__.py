"""``python -m trainer`` (and ``accelerate launch -m trainer``): the same as ``ddpo train``."""

import sys

from clients.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
