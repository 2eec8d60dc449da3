"""Quality of quantized exports on real weights (issue 16), written as JSON (docs/quant_quality.json).

1. The shipped MiniLM-L6 classifier (IA3 + head trained on the 160 shipped reviews, as the demo
   does), exported merged in fp32, int8 and int4: accuracy on the 40 held-out reviews, how often
   each quantized export picks fp32's label, and parity against the de-quantized reference.
2. The tiny Llama pretrained on the toy world with its adapter (train/examples.tiny_causal_lm),
   exported swappable fp32 and int4: greedy tokens of int4 vs fp32, adapter on and off.

Usage: .venv/bin/python scripts/quant_quality.py [--workdir DIR] [--out docs/quant_quality.json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np


def classifier(workdir: str) -> dict:
    from ia3_export.export import export_model
    from ia3_export.parity import check_parity
    from ia3_export.runtime import IA3Session
    from ia3_export.runtime.tokenizer import TextTokenizer
    from ia3_export.train.data import read_rows
    from ia3_export.examples.shipped import minilm_classifier

    trained = minilm_classifier(os.path.join(workdir, "minilm-adapter"), force=True)
    rows = [r.fields for r in read_rows(trained["eval_file"], "text-classification")]
    labels, result, predictions = trained["labels"], {"pytorch_accuracy": trained["accuracy_after"]}, {}
    for method in (None, "int8", "int4"):
        name = method or "fp32"
        out = os.path.join(workdir, f"minilm-{name}")
        export_model(trained["model_dir"], out, mode="merged", adapters=[trained["adapter_dir"]],
                     task="text-classification", force=True, quantize=method)
        session, tok = IA3Session(out), TextTokenizer(out)
        predictions[name] = []
        for row in rows:
            ids = np.array([tok.encode(row["text"])], dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
            predictions[name].append(labels[int(session.run(feeds)["logits"][0].argmax())])
        entry = {"accuracy": float(np.mean([p == str(r["label"]) for p, r in zip(predictions[name], rows)])),
                 "same_label_as_fp32": float(np.mean([a == b for a, b in zip(predictions[name], predictions["fp32"])])),
                 "model_bytes": os.path.getsize(os.path.join(out, "model.onnx"))}
        if method:
            report = check_parity(trained["model_dir"], out, [trained["adapter_dir"]])
            worst = max(report.outputs, key=lambda o: o.excess)
            logits = [o.comparison for o in report.outputs if o.case != "weights"]
            entry |= {"parity_passed": report.passed, "parity_tolerance": [report.atol, report.rtol],
                      "parity_max_abs_vs_dequantized": max(c.max_abs for c in logits),
                      "parity_worst": worst.line(), "parity_float_agreement": report.float_agreement}
        result[name] = entry
    result["eval_reviews"] = len(rows)
    return result


def generator(workdir: str) -> dict:
    from ia3_export.export import export_model
    from ia3_export.runtime import IA3Session
    from ia3_export.examples.shipped import ANIMALS, tiny_causal_lm

    lm = tiny_causal_lm(os.path.join(workdir, "tiny-lm"), force=True)
    outputs = {}
    for method in (None, "int4"):
        name = method or "fp32"
        out = os.path.join(workdir, f"tiny-lm-{name}")
        export_model(lm["base_dir"], out, mode="swappable", adapters=[lm["adapter_dir"]], force=True, quantize=method)
        session = IA3Session(out)
        adapter = session.load_shipped_adapters()[0]
        tok = session.tokenizer()
        outputs[name] = {which: [tok.encode(session.generate(s["prompt"], adapter=a, max_new_tokens=12))
                                 for s in lm["samples"]]
                         for which, a in (("base", None), ("adapter", adapter))}
    result = {"prompts": len(lm["samples"]), "new_tokens": 12}
    for which in ("base", "adapter"):
        same = total = identical = 0
        for a, b in zip(outputs["fp32"][which], outputs["int4"][which]):
            prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            same, total, identical = same + prefix, total + len(a), identical + (a == b)
        result[which] = {"token_agreement_int4_vs_fp32": same / max(total, 1), "identical_rows": identical}
    sounds = [ANIMALS[s["prompt"].split()[1]][0] for s in lm["samples"]]
    decode = IA3Session(os.path.join(workdir, "tiny-lm-int4")).tokenizer().decode
    result["says_sound_adapter"] = {name: float(np.mean([decode(t).startswith(snd) for t, snd in
                                                         zip(outputs[name]["adapter"], sounds)]))
                                    for name in outputs}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=os.path.join("docs", "quant_quality.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or scratch
        result = {"minilm_classifier_merged": classifier(workdir), "tiny_llama_swappable": generator(workdir)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
