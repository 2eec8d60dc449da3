#!/usr/bin/env bash
# The lean install (issue 8): a torch-free venv with `pip install .` (no extras) runs tests/lean/
# against folders exported by the full environment.
#   scripts/lean_check.sh [EXPORTS_DIR]
# EXPORTS_DIR (or $IA3_LEAN_DIR) holds what tests/lean/prepare.py wrote; without one it is prepared
# now with the full environment's python ($FULL_PYTHON, default .venv/bin/python).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
full_python=${FULL_PYTHON:-$root/.venv/bin/python}
lean=${LEAN_VENV:-$root/.venv-lean}
dir=${1:-${IA3_LEAN_DIR:-}}
if [ -z "$dir" ]; then
  dir=$(mktemp -d)
  "$full_python" tests/lean/prepare.py "$dir"
fi
[ -x "$lean/bin/python" ] || "${PYTHON:-python3}" -m venv "$lean"
# the wheel users install, with the CPU ONNX Runtime extra (built now unless scripts/test.sh already did)
wheel=${IA3_WHEEL:-$root/$(bash scripts/build_wheel.sh | tail -1)}
"$lean/bin/python" -m pip install -q "$wheel[cpu]" pytest
"$lean/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel"
"$lean/bin/python" - <<'PY'
import importlib.util, sys
heavy = [m for m in ("torch", "transformers", "onnx", "peft") if importlib.util.find_spec(m)]
sys.exit(f"the lean install pulled {', '.join(heavy)}" if heavy else 0)
PY
cd "$root/tests/lean"  # not the repo root: the installed package is tested, not the source tree
IA3_LEAN_DIR="$dir" "$lean/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$root" -c "$root/pyproject.toml" .
