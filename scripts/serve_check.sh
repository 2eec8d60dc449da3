#!/usr/bin/env bash
# The serve job (issue 17): `ia3-export serve` behind a real Triton Inference Server (pytriton) in a
# torch-free venv of its own (.venv-serve; pytriton pins numpy<2), tested against folders the full
# environment exported. See scripts/torchfree_job.sh.
#   scripts/serve_check.sh [EXPORTS_DIR]     (or $IA3_SERVE_DIR: what tests/serve/prepare.py wrote)
set -euo pipefail
[ $# -gt 0 ] && export IA3_SERVE_DIR=$1
# openai: the client users point at /v1; trustme: a test certificate authority for the HTTPS tests
exec bash "$(dirname "$0")/torchfree_job.sh" serve tests/serve IA3_SERVE_DIR serve,cpu openai trustme
