#!/usr/bin/env bash
# The whole test suite from a fresh clone (what CI runs through .ci/run), on the product as shipped:
#   1. set up .venv: torch 2.13.0 CPU first, then the wheel built from this tree, installed (not
#      editable) with its export, cpu and dev extras
#   2. the main pytest suite (transformers 5.x) against the INSTALLED package: PYTHONSAFEPATH keeps
#      the source tree off sys.path and tests/conftest.py refuses to run if ia3_export comes from it;
#      CLI tests run the installed `ia3-export` script
#   3. the interop job: optimum-onnx 0.1.0 loads our exports (its own venv, transformers 4.57, the
#      same wheel), and the IA3 core's tests again on transformers 4.57 in that venv
#   4. the lean job: a torch-free venv with the wheel's `cpu` extra serves folders the full one exported,
#      and the onnxruntime-genai job: genai (its own torch-free venv) loads our exports and adapters,
#      and the serve job: Triton (pytriton, its own torch-free venv with numpy<2) serves them on loopback,
#      and the JavaScript job: `npm ci` + Debian's chromium, ia3.mjs on onnxruntime-node and the demo page
#      on onnxruntime-web in headless Chromium, against the installed wheel's runtime (scripts/web_check.sh)
#   5. the main command, full run (the README's first command, minus set-up); its last line names
#      any failed stage and it exits non-zero then
# Arguments go to the main pytest run. Fails on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n=== %s === (%s)\n' "$*" "$(date -u +%T)"; }
step "set-up: build the wheel, install it"
wheel=$(bash scripts/setup.sh | tail -1)
VENV=${IA3_VENV:-.venv}
export PYTHONSAFEPATH=1 IA3_TEST_INSTALLED=1 IA3_WHEEL="$PWD/$wheel"
step "main suite (transformers 5.x, installed wheel)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
step "interop: optimum-onnx 0.1.0 on transformers 4.57"
bash scripts/interop_optimum.sh
step "IA3 core on transformers 4.57"
.venv-optimum/bin/python -m pytest -q -p no:cacheprovider tests/core/test_config.py tests/core/test_core_model.py \
  tests/core/test_peft_interop.py tests/core/test_fold.py tests/core/test_core_errors.py
step "lean serving install (no torch)"
bash scripts/lean_check.sh
step "interop: onnxruntime-genai 0.18 serves our exports and adapters"
bash scripts/interop_genai.sh
step "serving: ia3-export serve behind Triton Inference Server (pytriton), loopback only"
bash scripts/serve_check.sh
step "JavaScript: ia3.mjs on onnxruntime-node, the demo page in headless Chromium"
bash scripts/web_check.sh
step "demo (full)"
"$VENV/bin/ia3-export" demo --workdir "$(mktemp -d)/demo"
step "done"
