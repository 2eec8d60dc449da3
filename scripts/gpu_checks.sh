#!/usr/bin/env bash
# Every CUDA check in one go, for a lent GPU machine (see ../shared/gpu/README.md):
#   the parity matrix (scripts/gpu_parity.py) and the fold-on-swap benchmark (scripts/bench_foldswap.py),
# both on folders prepared beforehand on the CPU machine:
#   .venv/bin/python scripts/gpu_parity.py --prepare .gpu-parity          # -> .gpu-parity.tar.xz
#   .venv/bin/python scripts/bench_foldswap.py --prepare runs/foldswap-gpu --strip  # fp16, hidden 1024, 16 layers
# On the GPU machine, with onnxruntime-gpu on PYTHONPATH: bash scripts/gpu_checks.sh
# Results go to $OUT (or runs/gpu). Each step has its own time limit so one cannot starve the other.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import onnxruntime as o, torch, transformers; print('onnxruntime', o.__version__, o.get_available_providers(), 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
status=0
if [ -d runs/foldswap-gpu ]; then
  timeout "${FOLDSWAP_LIMIT:-90}" python3 scripts/bench_foldswap.py --run runs/foldswap-gpu --provider cuda --out "$out" \
    > "$out/bench_foldswap.log" 2>&1 || status=1
  tail -25 "$out/bench_foldswap.log"
fi
timeout "${PARITY_LIMIT:-180}" python3 scripts/gpu_parity.py --run .gpu-parity.tar.xz --out "$out" --workers 12 \
  > "$out/gpu_parity.log" 2>&1 || status=1
tail -15 "$out/gpu_parity.log"
exit $status
