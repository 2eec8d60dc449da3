#!/usr/bin/env bash
# Interop check (issue 15): onnxruntime-genai 0.18 serves folders written by `ia3-export export` (merged,
# swappable) and our .onnx_adapter files (from export and convert), with transformers' greedy tokens.
# genai gets its own venv (.venv-genai, git-ignored): onnxruntime-genai==0.18.0 pins onnxruntime>=1.31
# (a separate wheel, not bundled) and numpy; our wheel goes in torch-free (its lean dependencies + cpu).
# The folders are exported by the main venv ($FULL_PYTHON, default .venv/bin/python), as lean_check does.
#   bash scripts/interop_genai.sh [EXPORTS_DIR] [pytest args]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
full_python=${FULL_PYTHON:-$root/.venv/bin/python}
venv=${IA3_GENAI_VENV:-$root/.venv-genai}
dir=${1:-${IA3_GENAI_DIR:-}}
[ $# -gt 0 ] && shift
if [ -z "$dir" ]; then
  dir=$(mktemp -d)
  "$full_python" tests/interop_genai/prepare.py "$dir"
fi
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
# the wheel users install (built now unless scripts/test.sh already did), its cpu extra giving onnxruntime
wheel=${IA3_WHEEL:-$root/$(bash scripts/build_wheel.sh | tail -1)}
"$venv/bin/python" -m pip install -q onnxruntime-genai==0.18.0 pytest "$wheel[cpu]"
"$venv/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel"
IA3_GENAI_DIR="$dir" PYTHONSAFEPATH=1 exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/interop_genai "$@"
