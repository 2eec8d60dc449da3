"""Tokens/s of ia3-export's Python generation loop vs onnxruntime-genai's C++ loop on the same export.

Runs in the genai venv (scripts/interop_genai.sh makes .venv-genai): both runtimes in one process, the
same ORT thread count, interleaved rounds, median. The Llama-shaped export (swappable, one adapter
active in both) is made once by the main venv ($FULL_PYTHON, default .venv/bin/python), since export
needs torch. Every run generates exactly NEW tokens (ours ignores EOS; genai's min_length holds it off).

  .venv-genai/bin/python scripts/bench_genai.py [--hidden 384] [--rounds 7] [--threads 1] [--out docs/]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE = """
import sys, torch
torch.set_num_threads(2)
from ia3_export.core.config import IA3Config
from ia3_export.export import export_model
from ia3_export.core.loading import load_base_model
from ia3_export.core.model import IA3Model
from ia3_export.examples.tiny import randomize_adapter, save_tiny
out, hidden, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = save_tiny(out + "/base", "llama", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                 num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=512)
model = IA3Model(load_base_model(base), IA3Config())
randomize_adapter(model, "default", seed=1)
adapter = model.save_adapter(out + "/adapter")
export_model(base, out + "/swappable", mode="swappable", adapters=[adapter])
"""


def prepare(hidden: int, layers: int) -> str:
    folder = os.path.join(tempfile.gettempdir(), f"ia3-bench-genai-h{hidden}-l{layers}")
    if not os.path.isdir(os.path.join(folder, "swappable")):
        full = os.environ.get("FULL_PYTHON", os.path.join(ROOT, ".venv", "bin", "python"))
        subprocess.run([full, "-c", PREPARE, folder, str(hidden), str(layers)], check=True)
    return os.path.join(folder, "swappable")


class Ours:
    def __init__(self, folder: str, threads: int, adapter: str | None = "adapter"):
        import onnxruntime as ort

        from ia3_export.runtime import IA3Session

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
        self.session = IA3Session(folder, session_options=options)
        if adapter:
            self.session.set_adapter(self.session.load_adapter(adapter))

    def generate(self, prompts: list[list[int]], new: int) -> tuple[list[list[int]], list[float]]:
        from ia3_export.runtime import GenerationOptions
        from ia3_export.runtime.generation import iter_tokens

        outs, steps = [[] for _ in prompts], []
        start = time.perf_counter()
        for step in iter_tokens(self.session, prompts, None, GenerationOptions(max_new_tokens=new, eos_token_ids=[])):
            for row, token in step.items():
                outs[row].append(token)
            steps.append(time.perf_counter() - start)
            start = time.perf_counter()
        return outs, steps


class Genai:
    def __init__(self, folder: str, threads: int, adapter: str | None = "adapter"):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(folder)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.adapter, self.adapters = adapter, None
        if adapter:
            self.adapters = og.Adapters(self.model)
            self.adapters.load(os.path.join(folder, "adapters", f"{adapter}.onnx_adapter"), adapter)

    def generate(self, prompts: list[list[int]], new: int) -> tuple[list[list[int]], list[float]]:
        params = self.og.GeneratorParams(self.model)
        length = len(prompts[0]) + new
        params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=len(prompts))
        generator = self.og.Generator(self.model, params)
        if adapter := self.adapter:
            generator.set_active_adapter(self.adapters, adapter)
        steps, start = [], time.perf_counter()
        generator.append_tokens(np.array(prompts, dtype=np.int32))  # runs the prompt and picks the first token
        while True:
            generator.get_next_tokens()
            steps.append(time.perf_counter() - start)
            if generator.is_done():
                break
            start = time.perf_counter()
            generator.generate_next_token()
        return [[int(t) for t in generator.get_sequence(i)][len(prompts[0]):] for i in range(len(prompts))], steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs"))
    args = parser.parse_args()

    import onnxruntime
    import onnxruntime_genai as og

    folder = prepare(args.hidden, args.layers)
    runtimes = {"ours": Ours(folder, args.threads), "genai": Genai(folder, args.threads)}
    rng = np.random.default_rng(0)
    result = {"model": {"type": "llama", "hidden": args.hidden, "layers": args.layers, "mode": "swappable",
                        "adapter_active": True},
              "prompt_tokens": args.prompt, "new_tokens": args.new, "threads": args.threads, "rounds": args.rounds,
              "versions": {"onnxruntime": onnxruntime.__version__, "onnxruntime_genai": og.__version__},
              "batches": {}}
    for batch in args.batches:
        prompts = rng.integers(4, 300, (batch, args.prompt)).tolist()
        outs = {name: rt.generate(prompts, args.new)[0] for name, rt in runtimes.items()}  # warm-up, and the tokens
        totals, steps = {name: [] for name in runtimes}, {name: [] for name in runtimes}
        for r in range(args.rounds):  # interleaved, alternating which goes first
            for name in (list(runtimes) if r % 2 == 0 else list(runtimes)[::-1]):
                start = time.perf_counter()
                _, step_times = runtimes[name].generate(prompts, args.new)
                totals[name].append(time.perf_counter() - start)
                steps[name] += step_times[1:]  # decode steps: after the prompt's step
        # the per-step median is robust to the preemptions of a shared machine; the totals are not
        step_ms = {name: 1000 * statistics.median(t) for name, t in steps.items()}
        total = {name: statistics.median(t) for name, t in totals.items()}
        result["batches"][str(batch)] = {
            **{f"{name}_ms_per_decode_step": step_ms[name] for name in runtimes},
            "ours_over_genai_per_step": step_ms["ours"] / step_ms["genai"],
            **{f"{name}_tokens_per_s": batch * args.new / total[name] for name in runtimes},
            "ours_over_genai_total": total["ours"] / total["genai"],
            "same_tokens": outs["ours"] == outs["genai"],
            "totals_s": totals,
        }
        print(batch, {k: v for k, v in result["batches"][str(batch)].items() if k != "totals_s"}, flush=True)
    write_result(args.out, "bench_genai", result, stamp=False)


if __name__ == "__main__":
    main()
