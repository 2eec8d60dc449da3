#!/usr/bin/env bash
# The lean serving install: a torch-free venv with the wheel's `cpu` extra runs tests/lean/ against
# folders exported by the full environment (see scripts/torchfree_job.sh).
#   scripts/lean_check.sh [EXPORTS_DIR]     (or $IA3_LEAN_DIR: what tests/lean/prepare.py wrote)
set -euo pipefail
[ $# -gt 0 ] && export IA3_LEAN_DIR=$1
exec bash "$(dirname "$0")/torchfree_job.sh" lean tests/lean IA3_LEAN_DIR cpu
