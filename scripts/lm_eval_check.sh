#!/usr/bin/env bash
# lm-evaluation-harness against `ia3-export serve`, as an evaluation pipeline runs it: lm-eval's own
# `local-completions` model (token-id prompts, `echo: true, logprobs: 1, max_tokens: 1`) on a small
# multiple-choice task (scripts/lm_eval/, 12 questions x 3 choices, a local file: no hub), against the
# OpenAI-compatible API of a server on the tiny llama bank export, adapter llama-a1. Each of the 36
# loglikelihoods lm-eval logs (and its is_greedy) is then recomputed by PEFT in float64 from the token
# ids lm-eval's own `_encode_pair` gives: exit 1 past 1e-4. Three venvs, because the three stacks
# differ: the full one (.venv: PEFT, the export), the serve one (.venv-serve, what
# scripts/serve_check.sh builds: pytriton pins numpy<2) and lm-eval's (.venv-lmeval, torch-free).
#   scripts/lm_eval_check.sh [EXPORTS_DIR]     (what tests/serve/prepare.py wrote; default: prepared now)
# Not in CI: lm-eval pulls datasets, pyarrow and scikit-learn. Writes runs/lm_eval_check-*.json.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
full=$root/.venv/bin/python serve=$root/.venv-serve/bin/python lmeval=$root/.venv-lmeval
[ -x "$full" ] || bash scripts/setup.sh >/dev/null
dir=${1:-}
if [ -z "$dir" ]; then
  dir=$(mktemp -d)
  "$full" tests/serve/prepare.py "$dir"
fi
[ -x "$serve" ] || IA3_SERVE_DIR=$dir PYTEST_ARGS="--co" bash scripts/serve_check.sh >/dev/null  # builds .venv-serve
[ -x "$lmeval/bin/python" ] || python3 -m venv "$lmeval"
"$lmeval/bin/python" -m pip install -q "lm-eval[api]==0.4.13" transformers
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$full" scripts/lm_eval/make_task.py "$work"

# the server, on free loopback ports, stopped (SIGTERM) when the evaluation is done
"$serve" - "$dir/llama-bank" "$work" <<'PY' &
import os, sys, time
from ia3_export.serve.process import ServerProcess, free_ports
(port,) = free_ports(1)
server = ServerProcess(sys.argv[1], "--openai-port", str(port), log_path=os.path.join(sys.argv[2], "server.log"))
with open(os.path.join(sys.argv[2], "port"), "w") as f:
    f.write(str(port))
while not os.path.exists(os.path.join(sys.argv[2], "done")):
    time.sleep(0.2)
server.stop()
PY
until [ -s "$work/port" ]; do sleep 1; done
port=$(cat "$work/port")
model_args="model=llama-a1,base_url=http://127.0.0.1:$port/v1/completions,tokenizer=$dir/llama-bank"
HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "$lmeval/bin/lm_eval" --model local-completions \
  --model_args "$model_args,tokenizer_backend=huggingface,max_length=128" \
  --include_path "$work/tasks" --tasks ia3_tiny_mc --output_path "$work/out" --log_samples
touch "$work/done"
wait

# lm-eval's token ids for each (context, continuation), from its own encoder; then PEFT's float64 sums
HF_HUB_OFFLINE=1 "$lmeval/bin/python" - "$work" "$dir/llama-bank" <<'PY'
import glob, json, os, sys
from lm_eval.models.openai_completions import LocalCompletionsAPI
work, tokenizer = sys.argv[1:]
lm = LocalCompletionsAPI(base_url="http://unused/v1/completions", model="llama-a1", tokenizer=tokenizer,
                         tokenizer_backend="huggingface", max_length=128)
pairs = []
for line in open(glob.glob(os.path.join(work, "out", "*", "samples_*.jsonl"))[0]):
    sample = json.loads(line)
    for args, resp in zip(sample["arguments"].values(), sample["resps"]):
        context, continuation = lm._encode_pair(args["arg_0"], args["arg_1"])
        pairs.append({"context": context, "continuation": continuation, "loglikelihood": float(resp[0][0]),
                      "is_greedy": resp[0][1] == "True"})
json.dump(pairs, open(os.path.join(work, "pairs.json"), "w"))
PY
mkdir -p runs
"$full" scripts/lm_eval/compare.py "$work/pairs.json" "$dir/llama-base" "$dir/llama-a1" \
  "runs/lm_eval_check-$(date -u +%Y%m%dT%H%M%S).json"
