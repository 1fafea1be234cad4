#!/usr/bin/env bash
# The whole test suite: install the dev environment, then run pytest (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh dev
exec "$PY" -m pytest "$@"
