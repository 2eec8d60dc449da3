#!/usr/bin/env bash
# The lean serving install: a torch-free venv with the wheel's `cpu` extra runs tests/lean/ against
# folders exported by the full environment (see scripts/torchfree_job.sh), twice: with the newest
# ONNX Runtime pip resolves, then with the oldest the `cpu` extra allows (pyproject's
# `onnxruntime>=X.Y`, pinned to `X.Y.*`), so the floor users may install is the one tested.
#   scripts/lean_check.sh [EXPORTS_DIR]     (or $IA3_LEAN_DIR: what tests/lean/prepare.py wrote)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] && export IA3_LEAN_DIR=$1
if [ -z "${IA3_LEAN_DIR:-}" ]; then  # prepared once for both passes
  IA3_LEAN_DIR=$(mktemp -d)
  "${FULL_PYTHON:-.venv/bin/python}" tests/lean/prepare.py "$IA3_LEAN_DIR"
  export IA3_LEAN_DIR
fi
[ -n "${IA3_WHEEL:-}" ] || { IA3_WHEEL=$PWD/$(bash scripts/build_wheel.sh | tail -1); export IA3_WHEEL; }
bash scripts/torchfree_job.sh lean tests/lean IA3_LEAN_DIR cpu
floor=$(sed -n 's/^cpu = \["onnxruntime>=\([0-9.]*\)"\]$/\1/p' pyproject.toml)
[ -n "$floor" ] || { echo "lean_check.sh: no 'cpu = [\"onnxruntime>=X.Y\"]' line in pyproject.toml" >&2; exit 1; }
IA3_LEAN_ORT=$floor bash scripts/torchfree_job.sh lean-floor tests/lean IA3_LEAN_DIR cpu "onnxruntime==$floor.*"
