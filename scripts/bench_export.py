"""Latency of exported graphs on ONNX Runtime CPU, as ratios measured side by side in one run.

A Llama-shaped model built from a config (no download) is exported as: base (no adapter),
merged (one adapter folded), swappable (vectors as inputs, one adapter fed) and bank (8 adapters,
each batch row its own), and optionally with the dynamo exporter too. Workloads: prefill of
batch 8 x 128 tokens, and a one-token decode step for batch 8 with a 128-token cache. Repeats
are interleaved across variants (so drift hits all alike) and summarised by the median.

    .venv/bin/python scripts/bench_export.py [--hidden 512 --layers 4 --repeats 30 --threads 1 --dynamo]

Writes runs/bench_export-<time>.json and prints the ratios (merged/base is the "zero added
latency" check; swappable/merged and bank/merged are the price of swapping).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(work: str, args) -> tuple[str, list[str]]:
    """The model folder and 8 random adapters (PEFT format)."""
    from ia3_export.core.config import IA3Config
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter, save_tiny

    model_dir = os.path.join(work, "model")
    if not os.path.isdir(model_dir):
        save_tiny(model_dir, "llama", hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                  num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
                  max_position_embeddings=512, vocab_size=args.vocab)
    adapters = []
    for seed in range(1, 9):
        path = os.path.join(work, f"adapter{seed}")
        if not os.path.isdir(path):
            model = IA3Model(load_base_model(model_dir), IA3Config())
            randomize_adapter(model, "default", seed=seed, spread=0.2)
            model.save_adapter(path)
        adapters.append(path)
    return model_dir, adapters


def export_all(model_dir: str, adapters: list[str], work: str, dynamo: bool) -> dict[str, dict]:
    from ia3_export.export import export_model

    plans = {"base": dict(), "merged": dict(adapters=adapters[:1]), "swappable": dict(mode="swappable", adapters=adapters[:1]),
             "bank": dict(mode="bank", adapters=adapters)}
    if dynamo:
        plans["base-dynamo"] = dict(exporter="dynamo")
    out = {}
    for name, options in plans.items():
        folder = os.path.join(work, f"onnx-{name}")
        start = time.perf_counter()
        manifest = export_model(model_dir, folder, force=True, **options)
        out[name] = {"folder": folder, "export_s": time.perf_counter() - start, "manifest": manifest}
        print(f"exported {name} in {out[name]['export_s']:.1f} s ({manifest['graphs']['model']['nodes']} nodes)", flush=True)
    return out


def feeds_for(manifest: dict, folder: str, batch: int, new: int, past: int, variant: str, rng) -> dict:
    from ia3_export.formats.onnx_adapter import read_onnx_adapter

    cache = manifest["cache"]
    vocab = 256
    mask = np.ones((batch, past + new), np.int64)
    feeds = {"input_ids": rng.integers(4, vocab, (batch, new), dtype=np.int64), "attention_mask": mask,
             "position_ids": np.broadcast_to(np.arange(past, past + new), (batch, new)).copy()}
    for i in range(cache["num_layers"]):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = rng.standard_normal((batch, cache["num_kv_heads"], past, cache["head_dim"])).astype(np.float32)
    if variant == "swappable":
        entry = manifest["adapters"][0]
        feeds |= read_onnx_adapter(os.path.join(folder, entry["file"]))
    if variant == "bank":
        per = [read_onnx_adapter(os.path.join(folder, a["file"])) for a in manifest["adapters"]]
        feeds |= {v["name"]: np.concatenate([p[v["name"]] for p in per]) for v in manifest["vectors"]}  # one-row banks
        feeds["adapter_ids"] = np.arange(batch, dtype=np.int64) % len(per)
    return feeds


def session(path: str, threads: int, optimized: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def optimized_ops(path: str, threads: int) -> dict[str, int]:
    """Op histogram of the graph ORT actually runs (after its fusions)."""
    from ia3_export.export.graph import op_histogram

    target = path + ".ort-optimized.onnx"
    session(path, threads, optimized=target)
    hist = op_histogram(target)
    os.remove(target)
    return hist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (1 is steadiest on shared machines)")
    parser.add_argument("--dynamo", action="store_true", help="also export base with the dynamo exporter and time it")
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "bench_export_work"))
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    import onnxruntime as ort
    import torch

    torch.set_num_threads(max(1, args.threads))
    os.makedirs(args.work, exist_ok=True)
    model_dir, adapters = build(args.work, args)
    exports = export_all(model_dir, adapters, args.work, args.dynamo)
    rng = np.random.default_rng(0)
    workloads = {"prefill 8x128": (8, 128, 0), "decode b8 past 128": (8, 1, 128)}
    sessions = {name: session(os.path.join(e["folder"], "model.onnx"), args.threads) for name, e in exports.items()}
    feeds = {(name, w): feeds_for(e["manifest"], e["folder"], *shape, name.split("-")[0], rng)
             for name, e in exports.items() for w, shape in workloads.items()}
    times = {key: [] for key in feeds}
    for key in feeds:  # warm-up
        sessions[key[0]].run(None, feeds[key])
    order = list(feeds)
    for _ in range(args.repeats):
        order.reverse()  # interleaved, alternating direction: every variant sees the same machine state
        for key in order:
            start = time.perf_counter()
            sessions[key[0]].run(None, feeds[key])
            times[key].append(time.perf_counter() - start)
    medians = {f"{n} | {w}": statistics.median(t) * 1e3 for (n, w), t in times.items()}
    ratios, paired = {}, {}

    def pair(a, b, w):  # ratio of medians, and the median of per-round ratios (drift cancels within a round)
        key = f"{a}/{b} | {w}"
        ratios[key] = statistics.median(times[(a, w)]) / statistics.median(times[(b, w)])
        paired[key] = statistics.median(x / y for x, y in zip(times[(a, w)], times[(b, w)]))

    for w in workloads:
        pair("merged", "base", w)  # identical graphs, different weights: the noise floor of this run
        for other in exports:
            if other not in ("merged", "base"):
                pair(other, "merged", w)
    result = {
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "type": "llama"},
        "threads": args.threads, "repeats": args.repeats, "median_ms": medians, "ratios": ratios, "paired_ratios": paired,
        "spread_ms": {f"{n} | {w}": [min(t) * 1e3, max(t) * 1e3] for (n, w), t in times.items()},
        "exports": {n: {"export_s": e["export_s"], "nodes": e["manifest"]["graphs"]["model"]["nodes"],
                        "max_abs_vs_pytorch": e["manifest"]["validation"]["max_abs"],
                        "ort_optimized_ops": optimized_ops(os.path.join(e["folder"], "model.onnx"), args.threads)}
                    for n, e in exports.items()},
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "machine": {"cpu_count": os.cpu_count(), "load_avg": os.getloadavg()},
    }
    os.makedirs(os.path.join(ROOT, "runs"), exist_ok=True)
    path = os.path.join(ROOT, "runs", f"bench_export-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    for k, v in medians.items():
        print(f"{k}: {v:.2f} ms")
    for k, v in ratios.items():
        print(f"{k}: {v:.3f} (median of per-round ratios {paired[k]:.3f})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
