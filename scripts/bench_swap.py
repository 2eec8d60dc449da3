#!/usr/bin/env python
"""Adapter switching on ONNX Runtime CPU: what swappable and bank exports cost against merged,
how fast a switch is, and what one bank batch buys over sequential per-adapter runs.

Every ratio comes from one run: the variants are timed in interleaved rounds (so machine noise
hits them alike) and the median of the rounds is reported, with the spread. JSON goes to runs/.

    .venv/bin/python scripts/bench_swap.py [--hidden 256 --layers 4 --rounds 60 --threads 1] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
from benchlib import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEVEN_B = {"layers": 32, "k_proj": 1024, "v_proj": 1024, "down_proj": 14336}  # Llama-2/Mistral-7B-shaped IA3 set


def export_folder(model_dir: str, out: str, mode: str, adapters: list[str]) -> str:
    """The project's exporter: merged folds the first adapter, swappable/bank ship them all."""
    from ia3_export.export import export_model

    export_model(model_dir, out, mode=mode, adapters=adapters[:1] if mode == "merged" else adapters)
    return out


def build(work: str, hidden: int, layers: int, num_adapters: int, modes=("merged", "swappable", "bank")) -> dict:
    from ia3_export.core.config import IA3Config
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter, save_tiny

    model_dir = save_tiny(os.path.join(work, "base"), "llama", hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                          num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
                          max_position_embeddings=512)
    adapters = []
    for i in range(num_adapters):
        model = IA3Model(load_base_model(model_dir), IA3Config())
        randomize_adapter(model, "default", seed=i + 1)
        adapters.append(model.save_adapter(os.path.join(work, f"a{i}")))
    return {mode: export_folder(model_dir, os.path.join(work, mode), mode, adapters)
            for mode in modes} | {"adapters": adapters}


def options(threads: int):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = o.inter_op_num_threads = threads
    o.log_severity_level = 3
    return o


def feeds(session, batch: int, seq: int, past: int, seed: int = 0) -> dict:
    from ia3_export.runtime.generation import empty_cache

    rng = np.random.default_rng(seed)
    f = {"input_ids": rng.integers(3, 300, (batch, seq)), "attention_mask": np.ones((batch, past + seq), np.int64),
         "position_ids": np.tile(np.arange(past, past + seq), (batch, 1))}
    for name, value in empty_cache(session.graphs["model"], batch, "float32", session.folder.cache).items():
        shape = list(value.shape)
        shape[2] = past
        f[name] = rng.standard_normal(shape).astype(np.float32)
    return f


def interleaved(cases: dict, rounds: int, warmup: int = 3) -> dict:
    """name -> (median, p10, p90 ms) with the cases timed round-robin, plus `paired_over_<first>`:
    the median of per-round ratios to the first case (neighbours in time share the machine's noise)."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    first = next(iter(cases))
    out = {name: summary(ts) for name, ts in times.items()}
    for name in list(cases)[1:]:
        ratios = [t / b for t, b in zip(times[name], times[first])]
        out[f"paired_{name}_over_{first}"] = {"median": float(np.median(ratios)),
                                              "p10": float(np.percentile(ratios, 10)), "p90": float(np.percentile(ratios, 90))}
    return out


def summary(ts: list[float]) -> dict:
    q = np.percentile(ts, [10, 50, 90])
    return {"median_ms": float(q[1] * 1e3), "p10_ms": float(q[0] * 1e3), "p90_ms": float(q[2] * 1e3), "n": len(ts)}


def seven_b_folder(work: str) -> str:
    """A swappable folder whose graph takes a 7B-shaped IA3 vector set (and only sums it): the
    switch cost depends on the vectors, not on the weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ia3_export.formats.manifest import new_manifest, write_manifest

    names, nodes, inits, inputs, vectors = [], [], [], [], []
    for layer in range(SEVEN_B["layers"]):
        for module, dim in (("self_attn.k_proj", SEVEN_B["k_proj"]), ("self_attn.v_proj", SEVEN_B["v_proj"]),
                            ("mlp.down_proj", SEVEN_B["down_proj"])):
            name = f"model.layers.{layer}.{module}.ia3_l"
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [dim]))
            inits.append(numpy_helper.from_array(np.ones(dim, np.float32), name))
            nodes.append(helper.make_node("ReduceSum", [name], [name + ".sum"], keepdims=1))
            names.append(name + ".sum")
            vectors.append({"name": name, "graph": "model", "dim": dim, "feedforward": module == "mlp.down_proj"})
    nodes.append(helper.make_node("Sum", names, ["total"]))
    graph = helper.make_graph(nodes, "ia3_7b_vectors", inputs, [helper.make_tensor_value_info("total", TensorProto.FLOAT, [1])], inits)
    folder = tempfile.mkdtemp(prefix="seven_b-", dir=work)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), os.path.join(folder, "model.onnx"))
    write_manifest(folder, new_manifest(mode="swappable", task="feature-extraction", model_type="llama", dtype="fp32",
                                        opset=17, exporter="bench", graphs={"model": {"file": "model.onnx"}}, cache=None,
                                        vectors=vectors, adapters=[], tokens={}, versions={}))
    return folder


def switch_time(session, names: list[str], repeats: int) -> dict:
    ts = []
    for i in range(repeats):
        name = names[i % len(names)]
        t = time.perf_counter()
        session.set_adapter(name)
        ts.append(time.perf_counter() - t)
    return {k.replace("_ms", "_us"): v * 1e3 for k, v in summary(ts).items() if k.endswith("_ms")} | {"n": repeats}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs"))
    parser.add_argument("--work", help="Folder for the exports; reused when it already holds them (e.g. built on "
                                       "another machine: the timing run then needs no torch).")
    args = parser.parse_args()
    from ia3_export.runtime import IA3Session
    import onnxruntime as ort

    work = args.work or tempfile.mkdtemp(prefix="bench_swap-")
    if os.path.isfile(os.path.join(work, "bank", "ia3_export.json")):
        folders = {m: os.path.join(work, m) for m in ("merged", "swappable", "bank")}
        folders["adapters"] = [os.path.join(work, f"a{i}") for i in range(8)]
    else:
        folders = build(work, args.hidden, args.layers, num_adapters=8)
    opts = lambda: options(args.threads)  # noqa: E731
    merged = IA3Session(folders["merged"], session_options=opts())
    swappable = IA3Session(folders["swappable"], session_options=opts())
    bank = IA3Session(folders["bank"], session_options=opts())
    names = [swappable.load_adapter(a) for a in folders["adapters"]]
    for a in folders["adapters"]:
        bank.load_adapter(a)
    swappable.set_adapter(names[0])
    results = {"config": vars(args) | {"onnxruntime": ort.__version__, "machine": platform.machine(),
                                       "cpus": os.cpu_count(), "python": platform.python_version()}}

    for label, (seq, past) in {"prefill_8x128": (128, 0), "decode_8_past128": (1, 128)}.items():
        f = feeds(merged, 8, seq, past)
        cases = {"merged": lambda: merged.run(f), "swappable": lambda: swappable.run(f),
                 "bank_8_adapters": lambda: bank.run(f, adapters=names)}
        t = interleaved(cases, args.rounds)
        t["ratio_swappable_over_merged"] = t["swappable"]["median_ms"] / t["merged"]["median_ms"]
        t["ratio_bank_over_merged"] = t["bank_8_adapters"]["median_ms"] / t["merged"]["median_ms"]
        results[label] = t
        print(label, json.dumps(t, indent=1), flush=True)

    create = []
    for _ in range(5):
        t0 = time.perf_counter()
        IA3Session(folders["merged"], session_options=opts())
        create.append(time.perf_counter() - t0)
    new_session_ms = statistics.median(create) * 1e3
    seven_dir = seven_b_folder(work)
    seven = IA3Session(seven_dir)
    rng = np.random.default_rng(0)
    for i in range(2):
        path = os.path.join(seven_dir, f"7b_{i}.onnx_adapter")
        from ia3_export.formats.onnx_adapter import write_onnx_adapter
        write_onnx_adapter(path, {v: (1 + 0.1 * rng.standard_normal(s.dim)).astype(np.float32)
                                  for v, s in seven.folder.vectors.items()})
        seven.load_adapter(path, name=f"s{i}")
    sw_model = switch_time(swappable, names, 2000)
    sw_7b = switch_time(seven, ["s0", "s1"], 2000)
    results["switch"] = {
        "bench_model_vectors": len(swappable.folder.vectors), "bench_model": sw_model,
        "seven_b_vectors": len(seven.folder.vectors), "seven_b_values": sum(s.dim for s in seven.folder.vectors.values()),
        "seven_b": sw_7b, "new_merged_session_ms": new_session_ms,
        "speedup_vs_new_session_bench_model": new_session_ms * 1e3 / sw_model["median_us"],
        "speedup_vs_new_session_seven_b": new_session_ms * 1e3 / sw_7b["median_us"],
    }
    print("switch", json.dumps(results["switch"], indent=1), flush=True)

    prompts = [(f"request {i}: the adapter under test says", names[i]) for i in range(8)]
    gen = dict(max_new_tokens=args.new_tokens)

    def sequential():
        for prompt, name in prompts:
            swappable.set_adapter(name)
            swappable.generate(prompt, adapter=name, **gen)

    t = interleaved({"bank_one_batch": lambda: bank.generate_batch(prompts, **gen), "sequential_8": sequential},
                    max(5, args.rounds // 5), warmup=1)
    t["speedup_bank_over_sequential"] = t["sequential_8"]["median_ms"] / t["bank_one_batch"]["median_ms"]
    results["throughput_8_requests_8_adapters"] = t
    print("throughput", json.dumps(t, indent=1), flush=True)

    write_result(args.out, "bench_swap", results)


if __name__ == "__main__":
    sys.exit(main())
