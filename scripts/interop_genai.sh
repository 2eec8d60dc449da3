#!/usr/bin/env bash
# Interop check (issue 15): onnxruntime-genai 0.18 serves folders written by `ia3-export export` (merged,
# swappable) and our .onnx_adapter files (from export and convert), with transformers' greedy tokens.
# genai gets its own torch-free venv (.venv-genai): onnxruntime-genai==0.18.0 needs onnxruntime>=1.31
# (a separate wheel, not bundled: the wheel's `cpu` extra) and numpy. See scripts/torchfree_job.sh.
#   bash scripts/interop_genai.sh [EXPORTS_DIR]     (or $IA3_GENAI_DIR: what tests/interop_genai/prepare.py wrote)
set -euo pipefail
[ $# -gt 0 ] && export IA3_GENAI_DIR=$1
exec bash "$(dirname "$0")/torchfree_job.sh" genai tests/interop_genai IA3_GENAI_DIR cpu onnxruntime-genai==0.18.0
