#!/usr/bin/env bash
# Set up everything on a fresh machine: a venv with torch 2.13.0 (CPU build) installed FIRST,
# so nothing pulls a multi-GB CUDA torch, then this package with its export and dev extras.
# Idempotent: a second run only checks. IA3_VENV picks another venv folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${IA3_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[export,dev]"
