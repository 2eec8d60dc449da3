#!/usr/bin/env bash
# Build the wheel users install (build/wheel/ia3_export-*.whl) from the current tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
rm -rf build/wheel build/lib build/bdist.* ia3_export.egg-info
"$PY" -m pip wheel -q --no-deps -w build/wheel .
ls build/wheel/ia3_export-*.whl
