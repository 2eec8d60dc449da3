#!/usr/bin/env python
"""The continuous-batching Engine against request-at-a-time generate_ids, on a tiny bank export with
staggered arrivals and mixed adapters, prompt lengths and output lengths (greedy, no EOS: exact lengths).

Request-at-a-time: one worker runs each request alone (`generate_ids`) in arrival order, starting when
it has arrived and the previous one is done. Engine: its thread runs, a client thread submits each
request at its arrival time, and the callback records each request's first token and end. Both must
give the same tokens (checked). Latency = end - arrival; throughput = new tokens / makespan. JSON goes
to runs/. Under a minute on a 2-core machine (the export is built once; --work reuses it):

    .venv/bin/python scripts/bench_engine.py [--requests 24 --gap-ms 20 --max-batch 8] [--work DIR]

High churn, before against after: `--gap-ms 0 --new-tokens 8-128 --max-batch 16` queues every request
at once; `--baseline OLD/engine.py` runs another revision's Engine (this tree's runtime around it) in
the same process, `--repeats` rounds interleaved with this tree's, medians side by side; `--folder DIR`
runs any causal-lm export (bench_serve.py --prepare's bank or fused-merged) instead of building one.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import threading
import time

import bench_swap
import numpy as np
from benchlib import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPTERS = 4


def build(work: str, hidden: int, layers: int) -> str:
    """bench_swap's tiny llama with random IA3 adapters, exported as a bank (once per --work folder)."""
    folder = os.path.join(work, "bank")
    if not os.path.isfile(os.path.join(folder, "ia3_export.json")):
        bench_swap.build(work, hidden, layers, ADAPTERS, modes=("bank",))
    return folder


def workload(n: int, gap: float, seed: int, adapters: list[str], new_tokens: tuple[int, int]) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"arrival": i * gap, "prompt": rng.integers(5, 200, int(rng.integers(8, 33))).tolist(),
             "adapter": [None, *adapters][int(rng.integers(0, len(adapters) + 1))],
             "max_new": int(rng.integers(new_tokens[0], new_tokens[1] + 1))} for i in range(n)]


def engine_module(path: str | None):
    """This tree's engine module, or (path) another revision's engine.py loaded inside this tree's
    runtime package (its relative imports resolve here), to time both in one process."""
    import ia3_export.runtime.engine as ours

    if path is None:
        return ours
    spec = importlib.util.spec_from_file_location("ia3_export.runtime._baseline_engine", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def summary(reqs: list[dict], done: list[float], first: list[float], makespan: float, cpu_s: float) -> dict:
    """`cpu_s`: the process's CPU seconds meanwhile (every thread's, ONNX Runtime's included): tokens per
    CPU second moves less than tokens per second when other work shares the machine."""
    latency = np.array([d - r["arrival"] for r, d in zip(reqs, done)]) * 1000
    ttft = np.array([f - r["arrival"] for r, f in zip(reqs, first)]) * 1000
    tokens = sum(r["max_new"] for r in reqs)
    return {"makespan_s": round(makespan, 3), "tokens_per_s": round(tokens / makespan, 1),
            "cpu_s": round(cpu_s, 3), "tokens_per_cpu_s": round(tokens / cpu_s, 1),
            "latency_ms": {"mean": round(float(latency.mean()), 1), "p50": round(float(np.percentile(latency, 50)), 1),
                           "p99": round(float(np.percentile(latency, 99)), 1)},
            "first_token_ms": {"mean": round(float(ttft.mean()), 1), "p50": round(float(np.percentile(ttft, 50)), 1)}}


def one_at_a_time(session, reqs: list[dict]) -> tuple[dict, list]:
    from ia3_export.runtime.generation import GenerationOptions, iter_tokens

    start, cpu, done, first, outs = time.perf_counter(), time.process_time(), [], [], []
    for r in reqs:
        wait = start + r["arrival"] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        tokens = []
        for step in iter_tokens(session, [r["prompt"]], [r["adapter"]],
                                GenerationOptions(max_new_tokens=r["max_new"], eos_token_ids=[])):
            if not tokens:
                first.append(time.perf_counter() - start)
            tokens.append(step[0])
        done.append(time.perf_counter() - start)
        outs.append(tokens)
    return summary(reqs, done, first, done[-1], time.process_time() - cpu), outs


def engine_run(session, reqs: list[dict], max_batch: int, module) -> tuple[dict, list]:
    from ia3_export.runtime import GenerationOptions

    Request, Result = module.Request, module.Result
    n = len(reqs)
    first, done, handles = [None] * n, [None] * n, []
    finished = threading.Semaphore(0)
    engine = module.Engine(session, max_batch=max_batch, max_queue=n)

    def on_event(i):
        def record(event):
            now = time.perf_counter() - start
            if first[i] is None:
                first[i] = now
            if isinstance(event, Result):
                done[i] = now
                finished.release()
        return record

    with engine:
        start, cpu = time.perf_counter(), time.process_time()
        for i, r in enumerate(reqs):
            wait = start + r["arrival"] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            handles.append(engine.submit(Request(r["prompt"], r["adapter"], GenerationOptions(
                max_new_tokens=r["max_new"], eos_token_ids=[])), on_event=on_event(i)))
        for _ in range(n):
            finished.acquire()
    out = summary(reqs, done, first, max(done), time.process_time() - cpu)
    if hasattr(engine, "stats"):
        out["stats"] = dict(engine.stats)
    return out, [h.result().tokens for h in handles]


def median_run(runs: list[dict]) -> dict:
    """The round with the median throughput (every number of one round, so they stay consistent)."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "rounds_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--gap-ms", type=float, default=20.0, help="time between arrivals")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--new-tokens", default="8-64", help="LO-HI: each request's new tokens, drawn in this range")
    parser.add_argument("--repeats", type=int, default=1, help="engine rounds (interleaved with --baseline's); medians")
    parser.add_argument("--baseline", default=None, help="another revision's ia3_export/runtime/engine.py to time too")
    parser.add_argument("--folder", default=None, help="a causal-lm export to run instead of building the bank one")
    parser.add_argument("--work", default=None, help="reuse a folder built by an earlier run")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs"))
    args = parser.parse_args()

    import onnxruntime as ort

    from ia3_export.runtime import IA3Session

    work = args.work or tempfile.mkdtemp(prefix="bench_engine-")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = args.threads, 1, 3
    session = IA3Session(args.folder or build(work, args.hidden, args.layers), session_options=options)
    names = session.load_shipped_adapters() if session.binding.takes_adapters else []
    low, high = (int(x) for x in args.new_tokens.split("-"))
    reqs = workload(args.requests, args.gap_ms / 1000, args.seed, names, (low, high))
    engines = {"engine": engine_module(None), **({"engine_baseline": engine_module(args.baseline)} if args.baseline else {})}
    one_at_a_time(session, reqs[:2])  # warm-up
    alone, alone_tokens = one_at_a_time(session, reqs)
    runs: dict[str, list] = {name: [] for name in engines}
    same = True
    for name, module in [pair for _ in range(args.repeats) for pair in engines.items()]:
        summary_, tokens = engine_run(session, reqs, args.max_batch, module)
        runs[name].append(summary_)
        same = same and tokens == alone_tokens
    timed = {name: median_run(r) for name, r in runs.items()}

    def ratios(run: dict) -> dict:
        return {"throughput": round(run["tokens_per_s"] / alone["tokens_per_s"], 2),
                "tokens_per_cpu_s": round(run["tokens_per_cpu_s"] / alone["tokens_per_cpu_s"], 2),
                "mean_latency": round(run["latency_ms"]["mean"] / alone["latency_ms"]["mean"], 2),
                "p99_latency": round(run["latency_ms"]["p99"] / alone["latency_ms"]["p99"], 2)}

    result = {"script": "bench_engine", "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_average_at_start": os.getloadavg(),
              "model": {"folder": args.folder, "mode": session.mode, "adapters": len(names),
                        **({} if args.folder else {"hidden": args.hidden, "layers": args.layers})},
              "workload": {"requests": args.requests, "gap_ms": args.gap_ms, "prompt_tokens": "8-32",
                           "new_tokens": args.new_tokens, "max_batch": args.max_batch, "threads": args.threads,
                           "repeats": args.repeats},
              "request_at_a_time": alone, **timed, "same_tokens": same,
              "ratios": {name: ratios(run) for name, run in timed.items()},
              "work": work}
    if args.baseline:
        result["baseline"] = args.baseline
        result["ratios"]["engine_over_baseline"] = {key: round(
            timed["engine"][key] / timed["engine_baseline"][key], 2) for key in ("tokens_per_s", "tokens_per_cpu_s")}
    write_result(args.out, "bench_engine", result)
    print({k: result[k] for k in ("request_at_a_time", *timed, "ratios", "same_tokens")})
    if not same:
        raise SystemExit("the engine's tokens differ from request-at-a-time generation")


if __name__ == "__main__":
    main()
