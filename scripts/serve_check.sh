#!/usr/bin/env bash
# The serve job (issue 17): `ia3-export serve` behind a real Triton Inference Server (pytriton) in a
# torch-free venv of its own (pytriton pins numpy<2), tested against folders the full environment exported.
#   scripts/serve_check.sh [EXPORTS_DIR]
# EXPORTS_DIR (or $IA3_SERVE_DIR) holds what tests/serve/prepare.py wrote; without one it is prepared
# now with the full environment's python ($FULL_PYTHON, default .venv/bin/python).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
full_python=${FULL_PYTHON:-$root/.venv/bin/python}
venv=${SERVE_VENV:-$root/.venv-serve}
dir=${1:-${IA3_SERVE_DIR:-}}
if [ -z "$dir" ]; then
  dir=$(mktemp -d)
  "$full_python" tests/serve/prepare.py "$dir"
fi
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
# the wheel users install, with the serve and CPU ONNX Runtime extras (built now unless scripts/test.sh already did)
wheel=${IA3_WHEEL:-$root/$(bash scripts/build_wheel.sh | tail -1)}
"$venv/bin/python" -m pip install -q "$wheel[serve,cpu]" pytest
"$venv/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel"
"$venv/bin/python" - <<'PY'
import importlib.util, sys
heavy = [m for m in ("torch", "transformers", "onnx", "peft") if importlib.util.find_spec(m)]
sys.exit(f"the serve install pulled {', '.join(heavy)}" if heavy else 0)
PY
cd "$root/tests/serve"  # not the repo root: the installed package is tested, not the source tree
IA3_SERVE_DIR="$dir" "$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$root" -c "$root/pyproject.toml" .
