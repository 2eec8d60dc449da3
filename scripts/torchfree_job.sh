#!/usr/bin/env bash
# One torch-free job (lean serving, onnxruntime-genai interop, Triton serving): a venv of its own
# with the wheel users install (not the source tree) plus EXTRAS and PACKAGES, checked to hold no
# torch, transformers, onnx or peft, runs the tests in TEST_DIR against folders the full environment
# exported with TEST_DIR/prepare.py.
#   scripts/torchfree_job.sh NAME TEST_DIR DIR_VARIABLE EXTRAS [PACKAGE...]
# NAME picks the venv (.venv-NAME). DIR_VARIABLE (e.g. IA3_LEAN_DIR) names the prepared folders; unset,
# they are prepared now with the full environment's python ($FULL_PYTHON, default .venv/bin/python).
# IA3_WHEEL names the wheel (default: built now). PYTEST_ARGS go to pytest.
set -euo pipefail
name=$1 test_dir=$2 dir_variable=$3 extras=$4
shift 4
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=$root/.venv-$name
dir=${!dir_variable:-}
if [ -z "$dir" ]; then
  dir=$(mktemp -d)
  "${FULL_PYTHON:-$root/.venv/bin/python}" "$test_dir/prepare.py" "$dir"
fi
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
wheel=${IA3_WHEEL:-$root/$(bash scripts/build_wheel.sh | tail -1)}
"$venv/bin/python" -m pip install -q "$wheel[$extras]" pytest "$@"
"$venv/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel"  # this tree's build, same version
"$venv/bin/python" - "$name" <<'PY'
import importlib.util, sys
heavy = [m for m in ("torch", "transformers", "onnx", "peft") if importlib.util.find_spec(m)]
sys.exit(f"the {sys.argv[1]} install pulled {', '.join(heavy)}" if heavy else 0)
PY
cd "$root/$test_dir"  # not the repo root: the installed package is tested, not the source tree
export "$dir_variable=$dir" PYTHONSAFEPATH=1
# shellcheck disable=SC2086
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$root" -c "$root/pyproject.toml" . ${PYTEST_ARGS:-}
