"""Main-environment side of the onnxruntime-genai interop job: export tiny decoders (merged, swappable,
bank; llama also swappable on an int4 base), convert a PEFT adapter with `ia3-export convert`, and record transformers' (PEFT's) greedy tokens,
so tests/interop_genai/ can check onnxruntime-genai against them in its own venv.
Usage: python tests/interop_genai/prepare.py OUT_DIR"""
from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ for runtime_helpers

MODEL_TYPES = ["llama", "gpt2"]  # a type genai has its own name for, and one it runs as its generic decoder
PROMPTS = ["Hello wörld", "IA3 on genai: ünïcode"]
NEW_TOKENS = 10


def main(out: str) -> None:
    from ia3_export.core.config import IA3Config
    from ia3_export.export import export_model
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.runtime.tokenizer import TextTokenizer
    from ia3_export.examples.tiny import randomize_adapter, save_tiny
    from runtime_helpers import peft_greedy

    os.makedirs(out, exist_ok=True)
    expected = {"prompts": PROMPTS, "max_new_tokens": NEW_TOKENS, "models": {}}
    cli = os.path.join(os.path.dirname(sys.executable), "ia3-export")
    for model_type in MODEL_TYPES:
        root = os.path.join(out, model_type)
        base = save_tiny(os.path.join(root, "base"), model_type)
        adapters = []
        for seed in (1, 2):
            model = IA3Model(load_base_model(base), IA3Config())
            randomize_adapter(model, "default", seed=seed)
            adapters.append(model.save_adapter(os.path.join(root, f"adapter{seed}")))
        export_model(base, os.path.join(root, "merged"), mode="merged", adapters=adapters[:1])
        export_model(base, os.path.join(root, "swappable"), mode="swappable", adapters=adapters[:1])
        export_model(base, os.path.join(root, "bank"), mode="bank", adapters=adapters)
        if model_type == "llama":  # a quantized base with float vectors: one int4 graph for every adapter
            export_model(base, os.path.join(root, "swappable-int4"), mode="swappable", adapters=adapters[:1],
                         quantize="int4")
        subprocess.run([cli, "convert", adapters[1], "--model", os.path.join(root, "swappable"),
                        "--out", os.path.join(root, "adapter2.onnx_adapter")], check=True)
        ids = [TextTokenizer(base).encode(p) for p in PROMPTS]
        expected["models"][model_type] = {
            "prompt_ids": ids,
            "greedy": {name: peft_greedy(base, a, ids, NEW_TOKENS)
                       for name, a in (("base", None), ("adapter1", adapters[0]), ("adapter2", adapters[1]))},
        }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    print(f"onnxruntime-genai interop folders ready in {out}")


if __name__ == "__main__":
    main(sys.argv[1])
