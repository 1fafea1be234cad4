#!/usr/bin/env bash
# The main job: install, start `ddpo serve` as its own process, wait until healthy, score images through it with
# the Python client and with `ddpo score --json`, train the tiny model with `ddpo train` against it, then stop the
# server with SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh server,trainer
exec "$PY" scripts/demo.py "$@"
