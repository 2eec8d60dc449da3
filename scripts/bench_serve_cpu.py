#!/usr/bin/env python
"""Saturation of a server on any causal-lm export, with the server's own CPU time: N requests at once
(bench_serve.py's sweep requests: prompts of 4-16 ids, 8-128 new tokens, mixed adapters), R rounds, to a
`--batching continuous` server through generate_stream and (by default, then) a `--batching request`
server through generate; new tokens per second and per CPU second of the server's process group
(Triton, its Python stubs, the tokenizer's child: read from /proc), medians, and continuous / request.
Per CPU second moves less than per second when other work shares the machine, so two trees can be
compared run after run; the answers of the two modes must be equal (else it fails):

    PYTHONPATH=TREE .venv-serve/bin/python scripts/bench_serve_cpu.py EXPORTS/bank [--requests 40 --rounds 3]
    .venv-serve/bin/python scripts/bench_serve_cpu.py EXPORTS/fused-bank --modes continuous

(EXPORTS: what `bench_serve.py --prepare` wrote). JSON goes to runs/. Linux only (/proc).
"""
from __future__ import annotations

import argparse
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


def saturate(folder: str, mode: str, args) -> tuple[dict, list]:
    """One server in `mode`: a warm-up, then the rounds; (medians and rounds, the last round's answers)."""
    from ia3_export.serve.process import ServerProcess

    rounds = []
    with ServerProcess(folder, "--batching", mode, "--max-batch", str(args.max_batch), "--provider", "cpu",
                       "--drain-timeout", "10", log_path=os.path.join(args.out, f"bench_serve_cpu-{mode}.log")) as server:
        send = bs.streamed(server.url) if mode == "continuous" else bs.whole(server.url)
        bs.open_loop(send, bs.sweep_requests(8, seed=999), [0.0] * 8)  # warm-up
        for _ in range(args.rounds):
            cpu, start = group_cpu_s(server.process.pid), time.perf_counter()
            run = bs.open_loop(send, bs.sweep_requests(args.requests, seed=101), [0.0] * args.requests)
            cpu, wall = group_cpu_s(server.process.pid) - cpu, time.perf_counter() - start
            tokens = sum(len(r.get("tokens") or []) for r in run["records"])
            rounds.append({"new_tokens_per_s": round(tokens / wall, 1), "new_tokens_per_server_cpu_s": round(tokens / cpu, 1),
                           "errors": sum("error" in r for r in run["records"])})
    return {"rounds": rounds, **{f"median_{k}": statistics.median(r[k] for r in rounds) for k in KEYS}}, bs.answers(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a causal-lm export (bench_serve.py --prepare's EXPORTS/bank or EXPORTS/fused-bank)")
    parser.add_argument("--modes", default="continuous,request", help="--batching modes, one server each, in this order")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)  # the servers' logs go there before the result does
    result = {"script": "bench_serve_cpu", "folder": args.folder, "requests": args.requests}
    answers = {}
    for mode in args.modes.split(","):
        result[mode], answers[mode] = saturate(args.folder, mode, args)
    if len(answers) == 2:
        first, second = answers.values()
        result["mismatched"] = bs.mismatches(first, second)
        result["ratio"] = {k: round(result["continuous"][f"median_{k}"] / result["request"][f"median_{k}"], 3) for k in KEYS}
    result["load_average"] = os.getloadavg()
    write_result(args.out, "bench_serve_cpu", result)
    print(result)
    if result.get("mismatched"):
        raise SystemExit(f"answers differ between modes: requests {result['mismatched'][:10]}")


if __name__ == "__main__":
    main()
