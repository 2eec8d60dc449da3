#!/usr/bin/env python
"""What one decode run of a traced export costs by rows and cache width, and whether splitting a batch
by width would pay: the engine's rows share one concatenated cache, so every row pays for the widest.

Times ONNX Runtime's run alone (random cache, every position attended, adapter 0), median of --repeats,
for each ROWS x WIDTH, then compares one run of R rows at the widest width with two runs of R/2 rows
(one at the widest, one at each narrower width): the saving a split would bring, before any bookkeeping.

    .venv/bin/python scripts/bench_decode_run.py EXPORTS/bank [--rows 1,4,8,16 --widths 16,40,70,110,144]

(EXPORTS: what `bench_serve.py --prepare` wrote). JSON goes to runs/.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from benchlib import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_ms(session, rows: int, width: int, repeats: int) -> float:
    """Median ms of one decode run: `rows` rows, each with `width` cached positions and one new token."""
    rng = np.random.default_rng(0)
    feeds = {}
    for port in session.get_inputs():
        if port.name == "input_ids":
            feeds[port.name] = np.full((rows, 1), 7, np.int64)
        elif port.name == "attention_mask":
            feeds[port.name] = np.ones((rows, width + 1), np.int64)
        elif port.name == "position_ids":
            feeds[port.name] = np.full((rows, 1), width, np.int64)
        elif port.name.startswith("past_key_values."):
            heads, head_dim = port.shape[1], port.shape[3]
            feeds[port.name] = rng.standard_normal((rows, heads, width, head_dim), np.float32)
        elif port.name == "adapter_ids":
            feeds[port.name] = np.zeros((rows,), np.int64)
        else:
            raise SystemExit(f"input {port.name} is not one a traced decoder export has; pass a traced bank export")
    for _ in range(5):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a traced causal-lm bank export (bench_serve.py --prepare's EXPORTS/bank)")
    parser.add_argument("--rows", default="1,4,8,16")
    parser.add_argument("--widths", default="16,40,70,110,144")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs"))
    args = parser.parse_args()
    from ia3_export.runtime import IA3Session

    session = IA3Session(args.folder).graphs["model"].session
    rows, widths = [int(r) for r in args.rows.split(",")], [int(w) for w in args.widths.split(",")]
    ms = {(r, w): run_ms(session, r, w, args.repeats) for r in rows for w in widths}
    for r in rows:
        print(f"{r:>3} rows: " + ", ".join(f"{w} columns {ms[r, w]:.2f} ms" for w in widths))
    whole, widest = max(rows), max(widths)
    splits = []
    if whole // 2 in rows:
        for w in widths[:-1]:
            split = ms[whole // 2, widest] + ms[whole // 2, w]
            splits.append({"narrow_half_width": w, "one_run_ms": ms[whole, widest], "two_runs_ms": split,
                           "saving": 1 - split / ms[whole, widest]})
            print(f"{whole} rows at {widest}: one run {ms[whole, widest]:.2f} ms; half at {w} instead: two runs "
                  f"{split:.2f} ms ({splits[-1]['saving']:+.0%} saved)")
    write_result(args.out, "bench_decode_run", {"folder": args.folder, "repeats": args.repeats,
                                                "load_average": os.getloadavg(), "splits": splits,
                                                "ms": {f"{r}x{w}": round(v, 3) for (r, w), v in ms.items()}})


if __name__ == "__main__":
    main()
