#!/usr/bin/env bash
# The whole test suite from a fresh clone: set up, run pytest, then the interop and lean jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${IA3_VENV:-.venv}
"$VENV/bin/python" -m pytest -q "$@"
