"""Long-context generation time: our exports vs the graph onnxruntime-genai's model builder makes (issue 18).

One Llama-shaped model with random weights and a random IA3 adapter, in one process, the same ORT thread
count everywhere, interleaved rounds (alternating order), medians. Cells, each against the anchor
(genai driving the builder's export of the same merged model, `python -m onnxruntime_genai.models.builder
-p fp32 -e cpu`, run by hand here):
- ours_merged, ours_swappable: IA3Session on our traced exports (`--graph traced`, the default);
- fused_merged, fused_swappable: IA3Session on our `--graph fused` exports (swappable: adapter active);
- genai_fused_merged, genai_fused_swappable: genai on the same fused exports (swappable: our .onnx_adapter);
- genai_builder: the anchor.
Every run generates exactly NEW tokens (ours ignores EOS; genai's min_length holds it off).
Export needs torch: $FULL_PYTHON (default .venv/bin/python) builds the folders once; this script runs
where onnxruntime-genai is installed.

  .venv/bin/python scripts/bench_long.py [--quick] [--rounds 5] [--long-rounds 3] [--threads 2] [--out docs/]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_genai import Genai, Ours  # noqa: E402  (the runners: adapter=None for exports without one)
from benchlib import write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE = """
import sys, torch
torch.set_num_threads(2)
from ia3_export.core.config import IA3Config
from ia3_export.export import export_model
from ia3_export.core.loading import load_base_model
from ia3_export.core.merge import merge_to_folder
from ia3_export.core.model import IA3Model
from ia3_export.examples.tiny import randomize_adapter, save_tiny
from ia3_export.export.fused import run_builder
out, hidden, layers, heads, kv_heads, vocab = sys.argv[1], *map(int, sys.argv[2:7])
base = save_tiny(out + "/base", "llama", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads, vocab_size=vocab,
                 max_position_embeddings=2048)
model = IA3Model(load_base_model(base), IA3Config())
randomize_adapter(model, "default", seed=1)
adapter = model.save_adapter(out + "/adapter")
export_model(base, out + "/merged", mode="merged", adapters=[adapter])
export_model(base, out + "/swappable", mode="swappable", adapters=[adapter])
export_model(base, out + "/fused_merged", mode="merged", adapters=[adapter], graph="fused")
export_model(base, out + "/fused_swappable", mode="swappable", adapters=[adapter], graph="fused")
merge_to_folder(base, [adapter], out + "/hf_merged")
run_builder(out + "/hf_merged", out + "/builder", out + "/builder-cache")
"""
FOLDERS = ("merged", "swappable", "fused_merged", "fused_swappable", "builder")


def prepare(args) -> dict:
    shape = (args.hidden, args.layers, args.heads, args.kv_heads, args.vocab)
    folder = os.path.join(tempfile.gettempdir(), "ia3-bench-long-" + "-".join(map(str, shape)))
    if not all(os.path.isdir(os.path.join(folder, name)) for name in FOLDERS):
        shutil.rmtree(folder, ignore_errors=True)
        full = os.environ.get("FULL_PYTHON", os.path.join(ROOT, ".venv", "bin", "python"))
        subprocess.run([full, "-c", PREPARE, folder, *map(str, shape)], check=True)
    return {name: os.path.join(folder, name) for name in FOLDERS}


ANCHOR = "genai_builder"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, prompts 32 and 128 (development)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompts", type=int, nargs="+", default=[32, 1024])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--long-rounds", type=int, default=3, help="rounds for prompts of 512 tokens and more")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs"))
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.heads, args.kv_heads, args.prompts = 256, 2, 4, 2, [32, 128]

    import onnxruntime
    import onnxruntime_genai as og

    folders = prepare(args)
    runtimes = {
        "ours_merged": Ours(folders["merged"], args.threads, adapter=None),
        "ours_swappable": Ours(folders["swappable"], args.threads, adapter="adapter"),
        "fused_merged": Ours(folders["fused_merged"], args.threads, adapter=None),
        "fused_swappable": Ours(folders["fused_swappable"], args.threads, adapter="adapter"),
        "genai_fused_merged": Genai(folders["fused_merged"], args.threads, adapter=None),
        "genai_fused_swappable": Genai(folders["fused_swappable"], args.threads, adapter="adapter"),
        ANCHOR: Genai(folders["builder"], args.threads, adapter=None),
    }
    rng = np.random.default_rng(0)
    warm = rng.integers(4, args.vocab, (1, 16)).tolist()
    for rt in runtimes.values():
        rt.generate(warm, 4)
    result = {"model": {"type": "llama", "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                        "kv_heads": args.kv_heads, "intermediate": 2 * args.hidden, "vocab": args.vocab,
                        "weights": "random", "adapter": "random IA3 (k, v, down_proj); folded in merged exports"},
              "new_tokens": args.new, "threads": args.threads, "anchor": ANCHOR,
              "versions": {"onnxruntime": onnxruntime.__version__, "onnxruntime_genai": og.__version__},
              "cells": {}}
    for prompt_len in args.prompts:
        for batch in args.batches:
            rounds = args.long_rounds if prompt_len >= 512 else args.rounds
            prompts = rng.integers(4, args.vocab, (batch, prompt_len)).tolist()
            totals, prefill, decode, tokens = ({name: [] for name in runtimes} for _ in range(4))
            for r in range(rounds):  # interleaved, alternating which goes first
                for name in (list(runtimes) if r % 2 == 0 else list(runtimes)[::-1]):
                    start = time.perf_counter()
                    out, steps = runtimes[name].generate(prompts, args.new)
                    totals[name].append(time.perf_counter() - start)
                    prefill[name].append(steps[0])  # the prompt's step, then one step per new token
                    decode[name] += steps[1:]
                    tokens[name] = out
            total = {name: statistics.median(t) for name, t in totals.items()}
            step_ms = {name: 1000 * statistics.median(t) for name, t in decode.items()}
            cell = {
                "rounds": rounds,
                "total_s": total,
                "prefill_s": {name: statistics.median(t) for name, t in prefill.items()},
                "decode_ms_per_step": step_ms,
                "total_over_anchor": {name: total[name] / total[ANCHOR] for name in runtimes},
                "decode_step_over_anchor": {name: step_ms[name] / step_ms[ANCHOR] for name in runtimes},
                "tokens_per_s": {name: batch * args.new / total[name] for name in runtimes},
                "same_tokens_as_ours_merged": {name: tokens[name] == tokens["ours_merged"] for name in runtimes},
                "totals_s": totals,
            }
            result["cells"][f"prompt{prompt_len}_batch{batch}"] = cell
            print(f"prompt {prompt_len} batch {batch}: total/anchor",
                  {k: round(v, 3) for k, v in cell["total_over_anchor"].items()}, "step/anchor",
                  {k: round(v, 3) for k, v in cell["decode_step_over_anchor"].items()}, flush=True)
    write_result(args.out, "bench_long" + ("_quick" if args.quick else ""), result, stamp=False)


if __name__ == "__main__":
    main()
