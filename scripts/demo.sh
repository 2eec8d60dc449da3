#!/usr/bin/env bash
# The main job end to end on the embedded default: set up, then `ia3-export demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null  # its last line names the wheel; the demo table is what matters here
exec "${IA3_VENV:-.venv}/bin/ia3-export" demo "$@"
