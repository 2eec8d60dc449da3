#!/usr/bin/env python
"""One IA3Session serving several threads: per-thread IOBindings (what the session does) against
one lock around bind+run (the simpler alternative), on ONNX Runtime CPU.

Each request picks a random adapter and runs one prefill batch. A round sends the same requests
through a thread pool; the variants are timed in interleaved rounds and the median is reported.
JSON goes to runs/.

    .venv/bin/python scripts/bench_concurrency.py [--hidden 256 --layers 4 --rounds 15 --requests 32] [--work DIR]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.util
import os
import platform
import random
import sys
import tempfile
import threading
import time

import numpy as np
from benchlib import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_swap():
    """scripts/bench_swap.py's model builder, feeds and session options (one definition)."""
    spec = importlib.util.spec_from_file_location("bench_swap", os.path.join(ROOT, "scripts", "bench_swap.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32, help="requests per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--work", default=None, help="reuse a folder built by an earlier run")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs"))
    args = parser.parse_args()

    from ia3_export.runtime import IA3Session

    bs = bench_swap()
    work = args.work or tempfile.mkdtemp(prefix="bench_conc-")
    if os.path.isfile(os.path.join(work, "swappable", "ia3_export.json")):
        folder, adapters = os.path.join(work, "swappable"), [os.path.join(work, f"a{i}") for i in range(8)]
    else:
        built = bs.build(work, args.hidden, args.layers, num_adapters=8)
        folder, adapters = built["swappable"], built["adapters"]

    results = {}
    for intra in (1, 2):
        session = IA3Session(folder, session_options=bs.options(intra))
        names = [session.load_adapter(a) for a in adapters] + [None]
        feeds = bs.feeds(session, args.batch, args.seq, past=0)
        lock = threading.Lock()
        plan = [random.Random(i).choice(names) for i in range(args.requests)]

        def request(name, locked):
            if locked:
                with lock:
                    return session.run(feeds, adapters=[name] * args.batch)["logits"]
            return session.run(feeds, adapters=[name] * args.batch)["logits"]

        expected = {n: request(n, True) for n in names}
        for threads in (1, 2, 4):
            pool = concurrent.futures.ThreadPoolExecutor(threads)
            cases = {"lock": True, "per_thread": False}
            times = {c: [] for c in cases}
            for r in range(args.rounds + 2):  # two warm-up rounds
                for case, locked in cases.items():
                    t = time.perf_counter()
                    outs = list(pool.map(lambda n: (n, request(n, locked)), plan))
                    elapsed = time.perf_counter() - t
                    if r >= 2:
                        times[case].append(elapsed / len(plan))
                    worst = max(float(np.abs(o - expected[n]).max()) for n, o in outs)
                    assert worst < 1e-5, f"{case}: cross-talk, max diff {worst}"
            pool.shutdown()
            row = {c: bs.summary(ts) for c, ts in times.items()}
            ratios = [p / lk for p, lk in zip(times["per_thread"], times["lock"])]
            row["paired_per_thread_over_lock"] = {"median": float(np.median(ratios)),
                                                  "p10": float(np.percentile(ratios, 10)),
                                                  "p90": float(np.percentile(ratios, 90))}
            results[f"intra{intra}_threads{threads}"] = row
            print(f"intra-op {intra}, {threads} request threads: ms/request lock {row['lock']['median_ms']:.2f}, "
                  f"per-thread {row['per_thread']['median_ms']:.2f}, per-thread/lock "
                  f"{row['paired_per_thread_over_lock']['median']:.3f}", flush=True)

    import onnxruntime as ort

    out = {"args": vars(args) | {"work": work}, "results": results,
           "env": {"onnxruntime": ort.__version__, "cpus": os.cpu_count(), "python": platform.python_version(),
                   "load_avg": os.getloadavg(), "when": datetime.datetime.now(datetime.timezone.utc).isoformat()}}
    write_result(args.out, "bench_concurrency", out, stamp=False)


if __name__ == "__main__":
    sys.exit(main())
