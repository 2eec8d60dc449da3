"""Long-context generation time: our exports vs the graph onnxruntime-genai's model builder makes (issue 18).

One Llama-shaped model with random weights and a random IA3 adapter, in one process, the same ORT thread
count everywhere, interleaved rounds (alternating order), medians. Cells, each against the anchor
(genai driving the builder's export of the same merged model, `python -m onnxruntime_genai.models.builder
-p fp32 -e cpu`, run by hand here):
- ours_merged, ours_swappable: IA3Session on our traced exports (`--graph traced`, the default);
- fused_merged, fused_swappable, fused_foldswap: IA3Session on our `--graph fused` exports (swappable and
  foldswap: adapter active; foldswap's weights are graph inputs its fold graph filled);
- genai_fused_merged, genai_fused_swappable: genai on the same fused exports (swappable: our .onnx_adapter);
- genai_builder: the anchor.
Every run generates exactly NEW tokens (ours ignores EOS; genai's min_length holds it off).
--quantize int4: the fused exports with `--quantize int4` (our defaults: block 32, symmetric, accuracy level
0, LM head quantized; fused_merged, fused_swappable and their genai cells) and the same at accuracy level 4
(`*_level4`: int8 activations, what the builder's int4 graph uses) against the builder's own `-p int4 -e cpu`
graph under genai as the anchor (no traced or foldswap cells); the MatMulNBits attributes of every graph are
recorded (-> bench_long_int4.json).
Export needs torch: $FULL_PYTHON (default .venv/bin/python) builds the folders once; this script runs
where onnxruntime-genai is installed.

  .venv/bin/python scripts/bench_long.py [--quick] [--quantize int4] [--rounds 5] [--long-rounds 3] [--threads 2]
      [--out docs/]
      [--hidden 2048 --runners fused_merged fused_swappable ...]   (-> bench_long_h2048.json)
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
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
quantize = None if sys.argv[7] == "none" else sys.argv[7]
wanted = set(sys.argv[8:])  # the folders still missing
base, adapter = out + "/base", out + "/adapter"
if not os.path.isdir(adapter):
    save_tiny(base, "llama", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads, vocab_size=vocab,
              max_position_embeddings=2048)
    model = IA3Model(load_base_model(base), IA3Config())
    randomize_adapter(model, "default", seed=1)
    model.save_adapter(adapter)
if quantize is not None:
    from ia3_export.export import QuantizeOptions
for name, mode, graph in (("merged", "merged", "traced"), ("swappable", "swappable", "traced"),
                          ("fused_merged", "merged", "fused"), ("fused_swappable", "swappable", "fused"),
                          ("fused_foldswap", "foldswap", "fused"), ("fused_merged_level4", "merged", "fused"),
                          ("fused_swappable_level4", "swappable", "fused")):
    if name in wanted:
        options = quantize and QuantizeOptions(quantize, accuracy_level=4 if name.endswith("level4") else 0)
        export_model(base, out + "/" + name, mode=mode, adapters=[adapter], graph=graph, quantize=options)
if "builder" in wanted:
    merge_to_folder(base, [adapter], out + "/hf_merged", force=True)
    run_builder(out + "/hf_merged", out + "/builder", out + "/builder-cache", quantize or "fp32")
"""
# runner -> (its folder, how it runs it)
RUNNERS = {
    "ours_merged": ("merged", "ours", None),
    "ours_swappable": ("swappable", "ours", "adapter"),
    "fused_merged": ("fused_merged", "ours", None),
    "fused_swappable": ("fused_swappable", "ours", "adapter"),
    "fused_foldswap": ("fused_foldswap", "ours", "adapter"),
    "genai_fused_merged": ("fused_merged", "genai", None),
    "genai_fused_swappable": ("fused_swappable", "genai", "adapter"),
    "fused_merged_level4": ("fused_merged_level4", "ours", None),  # --quantize only, as the next three
    "fused_swappable_level4": ("fused_swappable_level4", "ours", "adapter"),
    "genai_fused_merged_level4": ("fused_merged_level4", "genai", None),
    "genai_fused_swappable_level4": ("fused_swappable_level4", "genai", "adapter"),
    "genai_builder": ("builder", "genai", None),
}
FLOAT_ONLY = ("ours_merged", "ours_swappable", "fused_foldswap")  # traced, or refusing --quantize
QUANTIZED_ONLY = tuple(r for r in RUNNERS if r.endswith("level4"))


def prepare(args, folders: set[str]) -> dict:
    """Export what is missing (kept between runs in the temp dir, one folder per model shape)."""
    shape = (args.hidden, args.layers, args.heads, args.kv_heads, args.vocab)
    folder = os.path.join(tempfile.gettempdir(), "ia3-bench-long-" + "-".join(map(str, shape))
                          + (f"-{args.quantize}" if args.quantize else ""))
    missing = sorted(name for name in folders if not os.path.isdir(os.path.join(folder, name)))
    if missing:
        full = os.environ.get("FULL_PYTHON", os.path.join(ROOT, ".venv", "bin", "python"))
        subprocess.run([full, "-c", "import os\n" + PREPARE, folder, *map(str, shape), args.quantize or "none",
                        *missing], check=True)
    return {name: os.path.join(folder, name) for name in folders}


def nbits_attributes(folder: str) -> dict:
    """How many MatMulNBits nodes of a graph have each (bits, block_size, accuracy_level)."""
    import onnx

    model = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False)
    seen: dict = {}
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        key = ", ".join(f"{k} {attrs.get(k, 0)}" for k in ("bits", "block_size", "accuracy_level"))
        seen[key] = seen.get(key, 0) + 1
    return seen


ANCHOR = "genai_builder"


RUNTIMES = {"ours": Ours, "genai": Genai}  # RUNNERS' second field


def _serve(conn, kind: str, folder: str, threads: int, adapter) -> None:
    """One runner in a process of its own (see `Isolated`): generate per request, timed here."""
    runner = RUNTIMES[kind](folder, threads, adapter=adapter)
    while (job := conn.recv()) is not None:
        start = time.perf_counter()
        out, steps = runner.generate(*job)
        conn.send((out, steps, time.perf_counter() - start))


class Isolated:
    """A runner in its own process, as each runtime is deployed: measured in one process, IA3Session's
    decode steps ran ~5-9% slower once genai had run there (same graph, same ORT; cause not found)."""

    def __init__(self, kind: str, folder: str, threads: int, adapter):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, kind, folder, threads, adapter), daemon=True)
        self.process.start()

    def generate(self, prompts, new: int):
        self.conn.send((prompts, new))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()


class InProcess:
    """A runner in this process (`--same-process`)."""

    def __init__(self, kind: str, folder: str, threads: int, adapter):
        self.runner = RUNTIMES[kind](folder, threads, adapter=adapter)

    def generate(self, prompts, new: int):
        start = time.perf_counter()
        out, steps = self.runner.generate(prompts, new)
        return out, steps, time.perf_counter() - start

    def close(self) -> None:
        pass


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
    parser.add_argument("--runners", nargs="+", choices=[r for r in RUNNERS if r != ANCHOR], default=None,
                        help="only these (the anchor always runs; default: all)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs"))
    parser.add_argument("--quantize", choices=["int4"], help="fused int4 exports vs the builder's -p int4 graph")
    parser.add_argument("--same-process", action="store_true",
                        help="every runner in this process (default: one process per runner)")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.heads, args.kv_heads, args.prompts = 256, 2, 4, 2, [32, 128]

    import onnxruntime
    import onnxruntime_genai as og

    offered = [r for r in RUNNERS if r not in (FLOAT_ONLY if args.quantize else QUANTIZED_ONLY)]
    chosen = [r for r in offered if r == ANCHOR or args.runners is None or r in args.runners]
    folders = prepare(args, {RUNNERS[r][0] for r in chosen})
    runner = InProcess if args.same_process else Isolated
    runtimes = {r: runner(RUNNERS[r][1], folders[RUNNERS[r][0]], args.threads, RUNNERS[r][2]) for r in chosen}
    rng = np.random.default_rng(0)
    warm = rng.integers(4, args.vocab, (1, 16)).tolist()
    for rt in runtimes.values():
        rt.generate(warm, 4)
    result = {"model": {"type": "llama", "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                        "kv_heads": args.kv_heads, "intermediate": 2 * args.hidden, "vocab": args.vocab,
                        "weights": "random", "adapter": "random IA3 (k, v, down_proj); folded in merged exports"},
              "new_tokens": args.new, "threads": args.threads, "anchor": ANCHOR,
              "processes": "one" if args.same_process else "one per runner",
              "versions": {"onnxruntime": onnxruntime.__version__, "onnxruntime_genai": og.__version__},
              "cells": {}}
    if args.quantize:
        result["quantize"] = {"method": args.quantize, "anchor": f"builder -p {args.quantize} -e cpu", "matmulnbits":
                              {name: nbits_attributes(path) for name, path in sorted(folders.items())}}
    for prompt_len in args.prompts:
        for batch in args.batches:
            rounds = args.long_rounds if prompt_len >= 512 else args.rounds
            prompts = rng.integers(4, args.vocab, (batch, prompt_len)).tolist()
            totals, prefill, decode, tokens = ({name: [] for name in runtimes} for _ in range(4))
            for r in range(rounds):  # interleaved, alternating which goes first
                for name in (list(runtimes) if r % 2 == 0 else list(runtimes)[::-1]):
                    out, steps, seconds = runtimes[name].generate(prompts, args.new)
                    totals[name].append(seconds)
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
                "same_tokens_as_anchor": {name: tokens[name] == tokens[ANCHOR] for name in runtimes},
                "totals_s": totals,
            }
            result["cells"][f"prompt{prompt_len}_batch{batch}"] = cell
            print(f"prompt {prompt_len} batch {batch}: total/anchor",
                  {k: round(v, 3) for k, v in cell["total_over_anchor"].items()}, "step/anchor",
                  {k: round(v, 3) for k, v in cell["decode_step_over_anchor"].items()}, flush=True)
    name = ("bench_long" + (f"_{args.quantize}" if args.quantize else "")
            + ("_quick" if args.quick else f"_h{args.hidden}" if args.hidden != 1024 else ""))
    write_result(args.out, name, result, stamp=False)
    for rt in runtimes.values():
        rt.close()


if __name__ == "__main__":
    main()
