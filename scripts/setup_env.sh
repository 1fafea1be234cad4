#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the project with the given extras.
#   source scripts/setup_env.sh dev      -> sets PY to the venv's python
set -euo pipefail
extras="${1:-server}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "ddpo needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
if [ ! -x "$root/.venv/bin/python" ]; then
    "$python" -m venv "$root/.venv"
fi
PY="$root/.venv/bin/python"
"$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$PY" -m pip install --quiet --disable-pip-version-check -e "$root[$extras]"
export PY
