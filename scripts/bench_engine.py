#!/usr/bin/env python
"""The continuous-batching Engine against request-at-a-time generate_ids, on a tiny bank export with
staggered arrivals and mixed adapters, prompt lengths and output lengths (greedy, no EOS: exact lengths).

Request-at-a-time: one worker runs each request alone (`generate_ids`) in arrival order, starting when
it has arrived and the previous one is done. Engine: its thread runs, a client thread submits each
request at its arrival time, and the callback records each request's first token and end. Both must
give the same tokens (checked). Latency = end - arrival; throughput = new tokens / makespan. JSON goes
to runs/. Under a minute on a 2-core machine (the export is built once; --work reuses it):

    .venv/bin/python scripts/bench_engine.py [--requests 24 --gap-ms 20 --max-batch 8] [--work DIR]
"""
from __future__ import annotations

import argparse
import os
import platform
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


def workload(n: int, gap: float, seed: int, adapters: list[str]) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"arrival": i * gap, "prompt": rng.integers(5, 200, int(rng.integers(8, 33))).tolist(),
             "adapter": [None, *adapters][int(rng.integers(0, len(adapters) + 1))],
             "max_new": int(rng.integers(8, 65))} for i in range(n)]


def summary(reqs: list[dict], done: list[float], first: list[float], makespan: float) -> dict:
    latency = np.array([d - r["arrival"] for r, d in zip(reqs, done)]) * 1000
    ttft = np.array([f - r["arrival"] for r, f in zip(reqs, first)]) * 1000
    tokens = sum(r["max_new"] for r in reqs)
    return {"makespan_s": round(makespan, 3), "tokens_per_s": round(tokens / makespan, 1),
            "latency_ms": {"mean": round(float(latency.mean()), 1), "p50": round(float(np.percentile(latency, 50)), 1),
                           "p99": round(float(np.percentile(latency, 99)), 1)},
            "first_token_ms": {"mean": round(float(ttft.mean()), 1), "p50": round(float(np.percentile(ttft, 50)), 1)}}


def one_at_a_time(session, reqs: list[dict]) -> tuple[dict, list]:
    from ia3_export.runtime.generation import GenerationOptions, iter_tokens

    start, done, first, outs = time.perf_counter(), [], [], []
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
    return summary(reqs, done, first, done[-1]), outs


def engine_run(session, reqs: list[dict], max_batch: int) -> tuple[dict, list]:
    from ia3_export.runtime import Engine, GenerationOptions, Request, Result

    n = len(reqs)
    first, done, handles = [None] * n, [None] * n, []
    finished = threading.Semaphore(0)
    engine = Engine(session, max_batch=max_batch, max_queue=n)

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
        start = time.perf_counter()
        for i, r in enumerate(reqs):
            wait = start + r["arrival"] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            handles.append(engine.submit(Request(r["prompt"], r["adapter"], GenerationOptions(
                max_new_tokens=r["max_new"], eos_token_ids=[])), on_event=on_event(i)))
        for _ in range(n):
            finished.acquire()
    return summary(reqs, done, first, max(done)), [h.result().tokens for h in handles]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--gap-ms", type=float, default=20.0, help="time between arrivals")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="reuse a folder built by an earlier run")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs"))
    args = parser.parse_args()

    import onnxruntime as ort

    from ia3_export.runtime import IA3Session

    work = args.work or tempfile.mkdtemp(prefix="bench_engine-")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = args.threads, 1, 3
    session = IA3Session(build(work, args.hidden, args.layers), session_options=options)
    names = session.load_shipped_adapters()
    reqs = workload(args.requests, args.gap_ms / 1000, args.seed, names)
    one_at_a_time(session, reqs[:2])  # warm-up
    alone, alone_tokens = one_at_a_time(session, reqs)
    batched, engine_tokens = engine_run(session, reqs, args.max_batch)
    same = engine_tokens == alone_tokens
    result = {"script": "bench_engine", "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "model": {"hidden": args.hidden, "layers": args.layers, "adapters": len(names), "mode": "bank"},
              "workload": {"requests": args.requests, "gap_ms": args.gap_ms, "prompt_tokens": "8-32",
                           "new_tokens": "8-64", "max_batch": args.max_batch, "threads": args.threads},
              "request_at_a_time": alone, "engine": batched,
              "same_tokens": same,
              "ratios": {"throughput": round(batched["tokens_per_s"] / alone["tokens_per_s"], 2),
                         "mean_latency": round(batched["latency_ms"]["mean"] / alone["latency_ms"]["mean"], 2),
                         "p99_latency": round(batched["latency_ms"]["p99"] / alone["latency_ms"]["p99"], 2)},
              "work": work}
    write_result(args.out, "bench_engine", result)
    print({k: result[k] for k in ("request_at_a_time", "engine", "ratios", "same_tokens")})
    if not same:
        raise SystemExit("the engine's tokens differ from request-at-a-time generation")


if __name__ == "__main__":
    main()
