#!/usr/bin/env python
"""Quantized exports on ONNX Runtime CPU (issue 16): file size and decode speed of int4 against
fp32 on a Llama-shaped model (hidden 1024, vocabulary 32k, random weights: speed does not
depend on their values), what keeping the IA3 vectors as inputs costs on an int4 base, and
MiniLM-L6 int8 against fp32 at batch 1 and 32.

Every ratio comes from one run: the variants are timed in interleaved rounds (machine noise hits
them alike), reported as the median of the per-round ratios with p10/p90. JSON goes to --out.

    .venv/bin/python scripts/bench_quant.py [--layers 4 --rounds 30 --threads 1] [--work DIR]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile

import numpy as np
from bench_swap import feeds, interleaved, options
from benchlib import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 8,
         "vocab_size": 32000, "max_position_embeddings": 512}


def graph_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.startswith("model.onnx"))


def build_llama(work: str, layers: int) -> dict:
    """fp32 merged, int4 merged, int4 swappable (one random adapter), int4 merged with int4 embeddings,
    int4 merged at accuracy level 4 (int8 activations)."""
    from ia3_export.core.config import IA3Config
    from ia3_export.export import QuantizeOptions, export_model
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter, save_tiny

    model_dir = save_tiny(os.path.join(work, "llama"), "llama", num_hidden_layers=layers, **LLAMA)
    model = IA3Model(load_base_model(model_dir), IA3Config())
    randomize_adapter(model, "default", seed=1)
    adapter = model.save_adapter(os.path.join(work, "adapter"), force=True)
    variants = {"fp32_merged": ("merged", None), "int4_merged": ("merged", QuantizeOptions("int4")),
                "int4_swappable": ("swappable", QuantizeOptions("int4")),
                "int4_merged_int4_embeddings": ("merged", QuantizeOptions("int4", embeddings=True)),
                "int4_merged_accuracy4": ("merged", QuantizeOptions("int4", accuracy_level=4))}
    folders = {}
    for name, (mode, quantize) in variants.items():
        folders[name] = os.path.join(work, name)
        if not os.path.isfile(os.path.join(folders[name], "ia3_export.json")):
            export_model(model_dir, folders[name], mode=mode, adapters=[adapter], quantize=quantize)
    return folders


def build_minilm(work: str) -> dict:
    from ia3_export.export import export_model
    from ia3_export.examples.shipped import minilm_dir

    folders = {}
    for name, quantize in (("fp32", None), ("int8", "int8")):
        folders[name] = os.path.join(work, f"minilm-{name}")
        if not os.path.isfile(os.path.join(folders[name], "ia3_export.json")):
            export_model(minilm_dir(), folders[name], mode="merged", task="feature-extraction", quantize=quantize)
    return folders


def encoder_feeds(batch: int, seq: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (batch, seq))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs"))
    parser.add_argument("--work", help="Folder for the exports; reused when it already holds them.")
    args = parser.parse_args()
    import onnxruntime as ort

    from ia3_export.runtime import IA3Session

    work = args.work or tempfile.mkdtemp(prefix="bench_quant-")
    llama = build_llama(work, args.layers)
    minilm = build_minilm(work)
    results = {"config": vars(args) | LLAMA | {"onnxruntime": ort.__version__, "machine": platform.machine(),
                                              "cpus": os.cpu_count(), "python": platform.python_version()}}
    sizes = {name: graph_bytes(folder) for name, folder in llama.items()}
    results["file_bytes"] = sizes
    results["size_ratio_int4_over_fp32"] = sizes["int4_merged"] / sizes["fp32_merged"]
    results["size_ratio_int4_embeddings_over_fp32"] = sizes["int4_merged_int4_embeddings"] / sizes["fp32_merged"]

    sessions = {name: IA3Session(llama[name], session_options=options(args.threads))
                for name in ("fp32_merged", "int4_merged", "int4_swappable", "int4_merged_accuracy4")}
    adapter = sessions["int4_swappable"].load_shipped_adapters()[0]
    sessions["int4_swappable"].set_adapter(adapter)
    f = feeds(sessions["fp32_merged"], 1, 1, args.past)
    decode = interleaved({name: (lambda s=s: s.run(f)) for name, s in sessions.items()}, args.rounds)
    decode["speedup_int4_over_fp32"] = 1 / decode["paired_int4_merged_over_fp32_merged"]["median"]
    decode["speedup_int4_accuracy4_over_fp32"] = 1 / decode["paired_int4_merged_accuracy4_over_fp32_merged"]["median"]
    decode["ratio_swappable_int4_over_merged_int4"] = (decode["paired_int4_swappable_over_fp32_merged"]["median"]
                                                       / decode["paired_int4_merged_over_fp32_merged"]["median"])
    results[f"decode_batch1_past{args.past}"] = decode
    print("decode", decode, flush=True)

    encoders = {name: IA3Session(folder, session_options=options(args.threads)) for name, folder in minilm.items()}
    results["minilm_file_bytes"] = {name: graph_bytes(folder) for name, folder in minilm.items()}
    for batch in (1, 32):
        ef = encoder_feeds(batch, 64)
        t = interleaved({name: (lambda s=s: s.run(ef)) for name, s in encoders.items()}, max(5, args.rounds // (4 if batch > 1 else 1)))
        t["speedup_int8_over_fp32"] = 1 / t["paired_int8_over_fp32"]["median"]
        results[f"minilm_batch{batch}_seq64"] = t
        print(f"minilm batch {batch}", t, flush=True)
    write_result(args.out, "bench_quant", results, stamp=False)


if __name__ == "__main__":
    main()
