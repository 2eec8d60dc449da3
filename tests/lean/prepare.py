"""Full environment side of the lean check: export tiny models and record what PEFT generates,
so the torch-free install can be checked against it. Usage: python tests/lean/prepare.py OUT_DIR"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ for runtime_helpers

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
NEW_TOKENS = 8


def main(out: str) -> None:
    from ia3_export.core.config import IA3Config
    from ia3_export.export import export_model
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter, save_tiny
    from runtime_helpers import peft_greedy

    os.makedirs(out, exist_ok=True)
    base = save_tiny(os.path.join(out, "base"), "llama")
    adapters = []
    for seed in (1, 2):
        model = IA3Model(load_base_model(base), IA3Config())
        randomize_adapter(model, "default", seed=seed)
        adapters.append(model.save_adapter(os.path.join(out, f"adapter{seed}")))
    for mode in ("swappable", "bank", "merged"):
        export_model(base, os.path.join(out, mode), mode=mode, adapters=adapters if mode != "merged" else adapters[:1])
    expected = {"prompts": PROMPTS, "max_new_tokens": NEW_TOKENS,
                "greedy": {os.path.basename(a): peft_greedy(base, a, PROMPTS, NEW_TOKENS) for a in adapters}}
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    print(f"lean check folders ready in {out}")


if __name__ == "__main__":
    main(sys.argv[1])
