"""Graph speed: `export --graph traced` vs `--graph fused` (onnxruntime-genai's builder graph, export/fused.py).

One ONNX Runtime session per graph (CPU, --threads intra-op threads), batch 1: a prefill of each
prompt length, then --steps greedy decode steps with the KV cache, timed separately; rounds
interleave the graphs, the median is reported with its spread and ratios to the fused graph.
How each graph is driven is how its layout is meant to run:
- ours (optimum layout): presents come back as OrtValues and are bound as the next step's past
  (the cache grows by Concat inside the graph); position_ids from the mask;
- fused: ONE pre-allocated [1, kv_heads, max_length, head_dim] buffer per cache tensor bound as both
  past input and present output (genai's past_present_share_buffer); no position_ids;
- fused-last: fused, and `logits_to_keep` = 1 (the LM head on the last position only);
- fused-grow: the fused graph fed like ours (presents bound as the next past), to separate the
  graph's gain from the shared buffer's.
Merged and swappable exports of each (swappable with one adapter's vectors bound as inputs).

  .venv/bin/python scripts/bench_fused_graph.py [--quick] [--rounds 3] [--threads 2] [--out docs/]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = dict(hidden=1024, layers=8, vocab=32000, prompts=[32, 1024])
QUICK = dict(hidden=256, layers=2, vocab=1000, prompts=[32, 128])


def prepare(hidden: int, layers: int, vocab: int, max_positions: int) -> dict[str, str]:
    """Base model + adapter + four exports (ours/fused x merged/swappable), made once per shape."""
    import torch

    from ia3_export.core.config import IA3Config
    from ia3_export.export import export_model
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter, save_tiny

    torch.set_num_threads(2)
    root = os.path.join(tempfile.gettempdir(), f"ia3-bench-graph-h{hidden}-l{layers}-v{vocab}")
    base, adapter = os.path.join(root, "base"), os.path.join(root, "adapter")
    if not os.path.isdir(base):
        save_tiny(base, "llama", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                  max_position_embeddings=max_positions)
    if not os.path.isdir(adapter):
        model = IA3Model(load_base_model(base), IA3Config())
        randomize_adapter(model, "default", seed=1)
        model.save_adapter(adapter)
    folders = {}
    for kind, graph in (("ours", "traced"), ("fused", "fused")):
        for mode in ("merged", "swappable"):
            folder = folders[f"{kind}-{mode}"] = os.path.join(root, f"{kind}-{mode}")
            if not os.path.isdir(folder):
                print(f"exporting {kind} {mode}", flush=True)
                export_model(base, folder, mode=mode, adapters=[adapter], graph=graph)
    folders["adapter"] = adapter
    return folders


class Runner:
    """One session over one graph, driven as its layout is meant to run (see the module doc)."""

    def __init__(self, folder: str, threads: int, vectors: dict, shared: bool, max_length: int, last: bool = False):
        import onnxruntime as ort

        from ia3_export.formats.manifest import read_manifest

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
        self.session = ort.InferenceSession(os.path.join(folder, "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        cache = read_manifest(folder)["cache"]
        self.kv = (cache["num_kv_heads"], cache["head_dim"])
        self.pairs = [(f"past_key_values.{i}.{kv}", f"present.{i}.{kv}") for i in range(cache["num_layers"])
                      for kv in ("key", "value")]
        self.positions = "position_ids" in {i.name for i in self.session.get_inputs()}
        self.arrays = {**vectors, **({"logits_to_keep": np.array([1], np.int64)} if last else {})}
        # OrtValues borrow the arrays' memory: self.arrays keeps them alive
        self.vectors = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in self.arrays.items()}
        self.shared, self.max_length = shared, max_length

    def start(self):
        import onnxruntime as ort

        self.binding = self.session.io_binding()
        for name, value in self.vectors.items():  # bind_cpu_input cannot bind an overridable initializer
            self.binding.bind_ortvalue_input(name, value)
        length = self.max_length if self.shared else 0
        self.past = {p: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, *self.kv[:1], length, self.kv[1]), np.float32))
                     for p, _ in self.pairs}
        self.total = 0

    def step(self, ids: np.ndarray) -> int:
        """Run new tokens `ids` [1, n]; returns the greedy next token."""
        b = self.binding
        self.total += ids.shape[1]
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", np.ones((1, self.total), np.int64))
        if self.positions:
            b.bind_cpu_input("position_ids", np.arange(self.total - ids.shape[1], self.total, dtype=np.int64)[None])
        for past, present in self.pairs:
            b.bind_ortvalue_input(past, self.past[past])
            if self.shared:
                b.bind_ortvalue_output(present, self.past[past])
            else:
                b.bind_output(present)
        b.bind_output("logits")
        self.session.run_with_iobinding(b)
        outputs = b.get_outputs()
        if not self.shared:
            self.past = {past: value for (past, _), value in zip(self.pairs, outputs)}
        return int(outputs[-1].numpy()[0, -1].argmax())

    def timed(self, prompt: np.ndarray, steps: int) -> tuple[float, float, list[int]]:
        """(prefill seconds, seconds for `steps` decode steps, the greedy tokens)."""
        self.start()
        t0 = time.perf_counter()
        tokens = [self.step(prompt)]
        t1 = time.perf_counter()
        for _ in range(steps):
            tokens.append(self.step(np.array([[tokens[-1]]], np.int64)))
        return t1 - t0, time.perf_counter() - t1, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small shape (hidden 256, 2 layers, prompts 32/128)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs"))
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    max_length = max(shape["prompts"]) + args.steps
    folders = prepare(shape["hidden"], shape["layers"], shape["vocab"], max(512, max_length))
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(folders["adapter"], "adapter_model.safetensors"))
    vectors = {k[len("base_model.model."):]: v.reshape(-1).astype(np.float32) for k, v in tensors.items()}
    runners = {}
    for mode in ("merged", "swappable"):
        fed = vectors if mode == "swappable" else {}
        runners[f"ours-{mode}"] = Runner(folders[f"ours-{mode}"], args.threads, fed, False, max_length)
        runners[f"fused-{mode}"] = Runner(folders[f"fused-{mode}"], args.threads, fed, True, max_length)
        runners[f"fused-last-{mode}"] = Runner(folders[f"fused-{mode}"], args.threads, fed, True, max_length, last=True)
        runners[f"fused-grow-{mode}"] = Runner(folders[f"fused-{mode}"], args.threads, fed, False, max_length)
    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(4, shape["vocab"], (1, n)) for n in shape["prompts"]}
    times = {(name, n, part): [] for name in runners for n in prompts for part in ("prefill", "decode")}
    tokens = {}
    for r in range(args.rounds + 1):  # round 0 warms up and is dropped
        for n, prompt in prompts.items():
            for name, runner in runners.items():
                prefill, decode, tokens[(name, n)] = runner.timed(prompt, args.steps)
                if r:
                    times[(name, n, "prefill")].append(prefill)
                    times[(name, n, "decode")].append(decode)
        print(f"round {r} done", flush=True)
    cells = {}
    for (name, n, part), values in times.items():
        cells.setdefault(f"prompt {n} {part}", {})[name] = {
            "median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}
    for cell in cells.values():
        for mode in ("merged", "swappable"):
            anchor = cell[f"fused-{mode}"]["median_s"]
            for name in (f"ours-{mode}", f"fused-last-{mode}", f"fused-grow-{mode}"):
                cell[name]["x_fused"] = cell[name]["median_s"] / anchor
    import onnxruntime

    result = {"shape": {**shape, "intermediate": 2 * shape["hidden"], "heads": shape["hidden"] // 64,
                        "kv_heads": shape["hidden"] // 64, "decode_steps": args.steps, "batch": 1},
              "threads": args.threads, "rounds": args.rounds, "onnxruntime": onnxruntime.__version__,
              "cells": cells,
              # greedy tokens of every graph of a mode agree (a graph that diverges is not the same model)
              "tokens_agree": {f"{mode} prompt {n}": len({tuple(t) for (name, m), t in tokens.items()
                                                          if m == n and name.endswith(mode)}) == 1
                               for mode in ("merged", "swappable") for n in prompts}}
    for label, cell in cells.items():
        print(label, {k: round(v.get("x_fused", 1.0), 3) for k, v in cell.items()})
    print("greedy tokens agree:", result["tokens_agree"])
    write_result(args.out, "bench_fused_graph" + ("_quick" if args.quick else ""), result, stamp=False)


if __name__ == "__main__":
    main()
