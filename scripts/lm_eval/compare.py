"""lm-eval's loglikelihoods (and is_greedy) through the server against PEFT in float64 on the same token
ids: PAIRS BASE ADAPTER OUT_JSON; exit 1 past 1e-4 or on any is_greedy that differs
(scripts/lm_eval_check.sh)."""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

TOLERANCE = 1e-4  # float32 logits summed over a few tokens


def main(pairs_path: str, base: str, adapter: str, out: str) -> int:
    pairs = json.load(open(pairs_path, encoding="utf-8"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).double().eval()
    diffs, greedy_equal = [], 0
    for pair in pairs:
        ids, n = pair["context"] + pair["continuation"], len(pair["continuation"])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        rows = logprobs[len(ids) - n - 1:len(ids) - 1]  # row k predicts continuation token k
        want = sum(float(rows[k, t]) for k, t in enumerate(pair["continuation"]))
        greedy = all(int(rows[k].argmax()) == t for k, t in enumerate(pair["continuation"]))
        diffs.append(abs(want - pair["loglikelihood"]))
        greedy_equal += greedy == pair["is_greedy"]
    report = {"loglikelihoods": len(pairs), "max_abs_diff": max(diffs), "is_greedy_equal": greedy_equal,
              "tolerance": TOLERANCE, "lm_eval": "0.4.13 local-completions", "reference": "PEFT float64"}
    json.dump(report, open(out, "w", encoding="utf-8"), indent=1)
    print(f"{len(pairs)} lm-eval loglikelihoods through the server vs PEFT float64: max |diff| {max(diffs):.2e}, "
          f"is_greedy equal {greedy_equal}/{len(pairs)} ({out})")
    return 0 if max(diffs) <= TOLERANCE and greedy_equal == len(pairs) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
