#!/usr/bin/env bash
# Interop check: optimum's ORTModelForCausalLM / ORTModelForSequenceClassification load folders written
# by `ia3-export export --mode merged`, and greedy generate() gives transformers' (PEFT's) tokens.
#
# optimum-onnx 0.1.0 needs transformers < 4.58, so it gets its own venv (.venv-optimum, git-ignored).
# The tiny models and PEFT adapters are made there (transformers 4.57 + PEFT); the exports are made by
# IA3_EXPORT_CLI (default: the main venv's ia3-export, transformers 5.x), or in that venv when
# IA3_EXPORT_CLI=inprocess (then the export core runs on transformers 4.57).
#
#   bash scripts/interop_optimum.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${IA3_OPTIMUM_VENV:-.venv-optimum}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install -q)
"${PIP[@]}" torch==2.13.0  # first and alone, so nothing else picks a torch build
"${PIP[@]}" transformers==4.57.6 "optimum-onnx[onnxruntime]==0.1.0" peft==0.21.2 safetensors onnx onnxscript \
  click pytest numpy tokenizers
# the package as users get it: the wheel (built now unless scripts/test.sh already did), not the source tree
wheel=${IA3_WHEEL:-$(bash scripts/build_wheel.sh | tail -1)}
"${PIP[@]}" --force-reinstall --no-deps "$wheel"
export PYTHONSAFEPATH=1
export IA3_INTEROP=1
export IA3_EXPORT_CLI="${IA3_EXPORT_CLI:-$PWD/.venv/bin/ia3-export}"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/interop "$@"
