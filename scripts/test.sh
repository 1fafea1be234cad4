#!/usr/bin/env bash
# The whole test suite: install the dev environment (and Chromium, when it can), then run pytest (extra arguments go
# to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh dev
bash scripts/setup_chromium.sh  # headless Chromium renders the evaluation report in tests/test_evaluation.py
exec "$PY" -m pytest "$@"
