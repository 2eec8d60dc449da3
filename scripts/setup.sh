#!/usr/bin/env bash
# Set up everything on a fresh machine, as a user gets the product: a venv with torch 2.13.0 (CPU
# build) installed FIRST, so nothing pulls a multi-GB CUDA torch, then the package built as a wheel
# and installed from it (not editable) with its export, cpu, fused and dev extras. The tests and the demo
# then run the installed `ia3-export`, so a file missing from the wheel or a broken entry point fails.
# Idempotent; re-installs the package from the current tree each run. IA3_VENV picks another venv
# folder; IA3_EDITABLE=1 installs editable instead (for development only).
#   scripts/setup.sh            prints the wheel's path on its last line
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${IA3_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" torch==2.13.0
if [ "${IA3_EDITABLE:-0}" = 1 ]; then
  "${PIP[@]}" -e ".[export,cpu,fused,dev]"
  exit 0
fi
bash scripts/build_wheel.sh >/dev/null
wheel=$(ls build/wheel/ia3_export-*.whl)
"${PIP[@]}" "$wheel[export,cpu,fused,dev]"
"${PIP[@]}" --force-reinstall --no-deps "$wheel"  # same version number: replace it with this tree's build
echo "$wheel"
