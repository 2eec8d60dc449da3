#!/usr/bin/env python
"""Saturation of a server on any causal-lm export, with the server's own CPU time: N requests at once
(bench_serve.py's sweep requests: prompts of 4-16 ids, 8-128 new tokens, mixed adapters), R rounds, to a
`--batching continuous` and a `--batching request` server started side by side. Each round runs three
cases back to back: the continuous server streamed (generate_stream), the continuous server answering
whole (generate: what request batching answers, so the batching policies compare like for like), and
the request server (generate). New tokens per second and per CPU second of the server's process group
(Triton, its Python stubs, the tokenizer's child: read from /proc), medians, and each case over request
batching as the median of the ratios paired within a round (a round that ran slow for every case
counts once). Per CPU second moves less than per second when other work shares the machine. The
answers of every case must be equal (else it fails):

    PYTHONPATH=TREE .venv-serve/bin/python scripts/bench_serve_cpu.py EXPORTS/bank [--requests 40 --rounds 5]
    .venv-serve/bin/python scripts/bench_serve_cpu.py EXPORTS/fused-bank --cases stream

(EXPORTS: what `bench_serve.py --prepare` wrote). JSON goes to runs/. Linux only (/proc).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import statistics
import time

import bench_serve as bs  # its requests, streaming client and open loop
from benchlib import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of the live processes in a process group."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


KEYS = ("new_tokens_per_s", "new_tokens_per_server_cpu_s")  # per round, and their medians
# case -> (the server's --batching, how it is asked)
CASES = {"stream": ("continuous", "streamed"), "whole": ("continuous", "whole"), "request": ("request", "whole")}


def round_of(server, send, args) -> tuple[dict, list]:
    """One burst of the requests to one server: (its tokens per second and per server CPU second, answers)."""
    cpu, start = group_cpu_s(server.process.pid), time.perf_counter()
    run = bs.open_loop(send, bs.sweep_requests(args.requests, seed=101), [0.0] * args.requests)
    cpu, wall = group_cpu_s(server.process.pid) - cpu, time.perf_counter() - start
    tokens = sum(len(r.get("tokens") or []) for r in run["records"])
    return ({"new_tokens_per_s": round(tokens / wall, 1), "new_tokens_per_server_cpu_s": round(tokens / cpu, 1),
             "errors": sum("error" in r for r in run["records"])}, bs.answers(run))


def main() -> None:
    from ia3_export.serve.process import ServerProcess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a causal-lm export (bench_serve.py --prepare's EXPORTS/bank or EXPORTS/fused-bank)")
    parser.add_argument("--cases", default="stream,whole,request", help=f"of {', '.join(CASES)}, in each round's order")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs"))
    args = parser.parse_args()
    cases = args.cases.split(",")
    if not cases or not set(cases) <= set(CASES):
        parser.error(f"--cases takes some of {', '.join(CASES)}")
    os.makedirs(args.out, exist_ok=True)  # the servers' logs go there before the result does
    result = {"script": "bench_serve_cpu", "folder": args.folder, "requests": args.requests, "cases": cases}
    rounds, answers = {case: [] for case in cases}, {}
    with contextlib.ExitStack() as stack:
        servers, sends = {}, {}
        for mode in sorted({CASES[case][0] for case in cases}):
            servers[mode] = stack.enter_context(ServerProcess(
                args.folder, "--batching", mode, "--max-batch", str(args.max_batch), "--provider", "cpu",
                "--drain-timeout", "10", log_path=os.path.join(args.out, f"bench_serve_cpu-{mode}.log")))
        for case in cases:
            mode, how = CASES[case]
            sends[case] = getattr(bs, how)(servers[mode].url)
            bs.open_loop(sends[case], bs.sweep_requests(8, seed=999), [0.0] * 8)  # warm-up
        for _ in range(args.rounds):
            for case in cases:
                measured, answers[case] = round_of(servers[CASES[case][0]], sends[case], args)
                rounds[case].append(measured)
    for case in cases:
        result[case] = {"rounds": rounds[case],
                        **{f"median_{k}": statistics.median(r[k] for r in rounds[case]) for k in KEYS}}
    first = answers[cases[0]]
    result["mismatched"] = sorted({i for case in cases[1:] for i in bs.mismatches(first, answers[case])})
    if "request" in cases:  # each case over request batching, paired within each round
        result["over_request"] = {case: {k: round(statistics.median(
            a[k] / b[k] for a, b in zip(rounds[case], rounds["request"])), 3) for k in KEYS}
            for case in cases if case != "request"}
    result["load_average"] = os.getloadavg()
    write_result(args.out, "bench_serve_cpu", result)
    print(result)
    if result["mismatched"]:
        raise SystemExit(f"answers differ between cases: requests {result['mismatched'][:10]}")


if __name__ == "__main__":
    main()
