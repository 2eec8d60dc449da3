#!/usr/bin/env bash
# The whole test suite from a fresh clone (what CI runs through .ci/run):
#   1. set up .venv (torch 2.13.0 CPU first, then the package with its export and dev extras)
#   2. the main pytest suite (transformers 5.x)
#   3. the interop job: optimum-onnx 0.1.0 loads our exports (its own venv, transformers 4.57),
#      and the IA3 core's tests again on transformers 4.57 in that venv
#   4. the lean job: a torch-free venv serves folders exported by the full one
#   5. the main command's quick run (the README's first command, minus set-up)
# Arguments go to the main pytest run. Fails on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${IA3_VENV:-.venv}
step() { printf '\n=== %s ===\n' "$*"; }
step "main suite (transformers 5.x)"
"$VENV/bin/python" -m pytest -q "$@"
step "interop: optimum-onnx 0.1.0 on transformers 4.57"
bash scripts/interop_optimum.sh
step "IA3 core on transformers 4.57"
.venv-optimum/bin/python -m pytest -q -p no:cacheprovider tests/test_config.py tests/test_core_model.py \
  tests/test_peft_interop.py tests/test_fold.py tests/test_core_errors.py
step "lean serving install (no torch)"
bash scripts/lean_check.sh
step "demo (quick)"
"$VENV/bin/ia3-export" demo --quick --workdir "$(mktemp -d)/demo"
