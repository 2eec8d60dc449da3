"""The JavaScript runtime's numbers (issue 24), side by side in one run on the same swappable exports:
greedy tokens/s of Python's IA3Session, of ia3.mjs on onnxruntime-node and of ia3.mjs on onnxruntime-web
(WASM, 2 threads, in the demo page in headless chromium; and on 1 thread); the adapter switch time in the browser; the
bytes a page downloads for an adapter vs for a merged model. Writes docs/web_bench.json.

  python scripts/bench_web.py [--repeats 5] [--rounds 2] [--max-new-tokens 64] [--out docs]

Two models, each built by examples/web/prepare.py's folder layout: `demo` (the page's own: a tiny Llama
trained on a toy world, hidden 64, 2 layers; its greedy answers are a few tokens long, so prefill counts)
and `llama-h256` (random weights, hidden 256, 4 layers, 64 new tokens: decode-bound). Every runtime gets
the same prompt ids and the same thread count; each round runs the three in turn (rounds interleave them,
against drift on a shared machine) and the medians are over all rounds' repeats. The runtimes must agree
on the greedy tokens, or the row says so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples", "web"))

from benchlib import write_result  # noqa: E402
import prepare  # noqa: E402
import serve  # noqa: E402

PROMPT = "the cat "


def larger_model(tmp: str) -> tuple[str, list[str]]:
    """A Llama-shaped random model (hidden 256, 4 layers) and one random adapter."""
    from ia3_export.examples.tiny import save_tiny

    base = save_tiny(os.path.join(tmp, "train", "base"), "llama", hidden_size=256, intermediate_size=688,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return base, [prepare.random_adapter(base, os.path.join(tmp, "train", "random-1"), seed=1)]


MODELS = {"demo": (prepare.demo_model, ["sounds", None]), "llama-h256": (larger_model, ["random-1"])}


def python_runs(folder: str, spec: dict) -> dict:
    """IA3Session's greedy loop (generate_ids, what IA3Session.generate runs) timed like bench.mjs."""
    from ia3_export.ort import session_options
    from ia3_export.runtime import IA3Session
    from ia3_export.runtime.generation import GenerationOptions, generate_ids

    options = session_options(spec["threads"])
    options.inter_op_num_threads = 1
    session = IA3Session(os.path.join(folder, "model"), session_options=options)
    session.load_shipped_adapters()
    greedy = GenerationOptions(max_new_tokens=spec["maxNewTokens"])
    runs = {}
    for adapter in spec["adapters"]:
        generate_ids(session, [spec["ids"]], [adapter], greedy)  # warm-up
        ms = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            tokens = generate_ids(session, [spec["ids"]], [adapter], greedy)[0]
            ms.append((time.perf_counter() - start) * 1000)
        runs[adapter or "(base)"] = {"tokens": tokens, "ms": ms}
    session.close()
    return {"runs": runs}


def node_runs(folder: str, spec: dict) -> dict:
    return _json_line(["node", os.path.join(HERE, "bench_web_node.mjs"), folder, json.dumps(spec)])


def browser_runs(folder: str, spec: dict) -> dict:
    with serve.running(folder) as url:
        return _json_line(["node", os.path.join(ROOT, "tests", "web", "browser_bench.mjs"), url, json.dumps(spec)])


def _json_line(command: list[str]) -> dict:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:2])} failed:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


RUNTIMES = {"python": python_runs, "node": node_runs, "web": browser_runs,
            # the same page on one WASM thread: what the second thread buys (or costs) on this machine
            "web-1thread": lambda folder, spec: browser_runs(folder, {**spec, "threads": 1})}


def summarize(model: str, rounds: list[dict]) -> list[dict]:
    """One row per (adapter, runtime): median ms, tokens/s, and whether its tokens equal Python's."""
    rows = []
    for adapter in rounds[0]["python"]["runs"]:
        reference = rounds[0]["python"]["runs"][adapter]["tokens"]
        for runtime in RUNTIMES:
            done = [r[runtime]["runs"][adapter] for r in rounds]
            ms = statistics.median(m for d in done for m in d["ms"])
            tokens = len(done[-1]["tokens"])
            rows.append({"model": model, "adapter": adapter, "runtime": runtime, "tokens": tokens,
                         "median_ms": round(ms, 2), "tokens_per_s": round(tokens / ms * 1000, 1),
                         "first_token_ms": round(statistics.median(f for d in done for f in d["firstTokenMs"]), 2)
                         if "firstTokenMs" in done[0] else None,
                         "same_tokens_as_python": all(d["tokens"] == reference for d in done)})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--switch-rounds", type=int, default=2000)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out", default=os.path.join(ROOT, "docs"))
    args = p.parse_args(argv)
    from ia3_export.runtime.tokenizer import TextTokenizer

    load_before = os.getloadavg()
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "load_avg_before": load_before},
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "prompt": PROMPT, "models": {}, "rows": []}
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            model, adapters = MODELS[name]
            folder = os.path.join(work, name)
            demo = prepare.prepare(folder, model=model)
            ids = TextTokenizer(os.path.join(folder, "model")).encode(PROMPT)
            spec = {"threads": args.threads, "maxNewTokens": args.max_new_tokens, "repeats": args.repeats,
                    "ids": ids, "adapters": adapters, "switchRounds": args.switch_rounds}
            rounds = []
            for i in range(args.rounds):
                rounds.append({runtime: run(folder, spec) for runtime, run in RUNTIMES.items()})
                print(f"{name}: round {i + 1}/{args.rounds} done", flush=True)
            web = rounds[-1]["web"]
            result["models"][name] = {
                "base_graph_bytes": demo["base"]["bytes"], "merged_graph_bytes": demo["merged"]["bytes"],
                "adapter_bytes": {a["name"]: a["bytes"] for a in demo["adapters"]},
                "browser": {"threads": web["threads"], "cross_origin_isolated": web["crossOriginIsolated"],
                            "onnxruntime_web": web["ort"], "open_ms": round(web["openMs"], 1),
                            "adapter_load_ms": {k: round(v["loadMs"], 3) for k, v in web["adapterLoad"].items()},
                            "switch": web["switches"]},
                "node": {"onnxruntime_node": rounds[-1]["node"]["ort"], "open_ms": round(rounds[-1]["node"]["openMs"], 1)},
            }
            result["rows"] += summarize(name, rounds)
    result["machine"]["load_avg_after"] = os.getloadavg()
    for row in result["rows"]:
        print(f"{row['model']:<11} {row['adapter']:<9} {row['runtime']:<11} {row['tokens']:>3} tokens "
              f"{row['median_ms']:>9.2f} ms {row['tokens_per_s']:>8.1f} tok/s  same tokens: {row['same_tokens_as_python']}")
    write_result(args.out, "web_bench", result, stamp=False)


if __name__ == "__main__":
    main()
