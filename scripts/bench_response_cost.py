#!/usr/bin/env python
"""What one streamed response costs the server in CPU: the number behind `RESPONSE_COST_S`, the
constant that paces generate_stream's responses (serve/streaming.py). A lone request (8 prompt ids,
128 new tokens) goes, R rounds interleaved, to two `--batching continuous` servers side by side: this
tree's, streamed as it paces, and a copy of this tree whose pacing is off (a response per token), and
also whole through generate. Each request's server CPU is read from /proc (the process group:
Triton, its Python stubs, the tokenizer's child); the cost of a response is the difference between
the two streamed cases over the difference in their responses (medians), so what a request costs
whatever its responses (its decode) cancels out:

    PYTHONPATH=TREE .venv-serve/bin/python scripts/bench_response_cost.py EXPORTS/bank [--rounds 12]

(EXPORTS: what `bench_serve.py --prepare` wrote). JSON goes to runs/. Linux only (/proc).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import tempfile
import time

import bench_serve as bs
from bench_serve_cpu import group_cpu_s
from benchlib import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUEST = {"input_ids": [5, 6, 7, 8, 9, 10, 11, 12], "adapter": "a1", "max_new_tokens": 128}


def unpaced_copy(work: str) -> str:
    """A copy of this tree's package whose streams send a response per token (STREAM_SHARE unbounded)."""
    shutil.copytree(os.path.join(ROOT, "ia3_export"), os.path.join(work, "ia3_export"))
    path = os.path.join(work, "ia3_export", "serve", "streaming.py")
    with open(path) as f:
        text, count = re.subn(r"^STREAM_SHARE = [0-9.e-]+", "STREAM_SHARE = 1e9", f.read(), flags=re.M)
    if count != 1:
        raise SystemExit(f"{path} has no STREAM_SHARE line to change")
    with open(path, "w") as f:
        f.write(text)
    return work


def main() -> None:
    from ia3_export.serve.process import ServerProcess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a bank export with adapter a1 (bench_serve.py --prepare's EXPORTS/bank)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="ia3-response-cost-"))
        trees = {"paced": ROOT, "every token": unpaced_copy(work)}
        servers = {}
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")]))}
            servers[name] = stack.enter_context(ServerProcess(
                args.folder, "--batching", "continuous", "--provider", "cpu", "--drain-timeout", "5", env=env,
                log_path=os.path.join(args.out, f"bench_response_cost-{name.replace(' ', '_')}.log")))
        cases = {"whole": (servers["paced"], bs.whole(servers["paced"].url)),
                 **{name: (server, bs.streamed(server.url)) for name, server in servers.items()}}
        for server, send in cases.values():
            for _ in range(3):  # warm-up
                send(REQUEST)
        runs = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (server, send) in cases.items():
                cpu, start = group_cpu_s(server.process.pid), time.perf_counter()
                tokens, responses = send(REQUEST)
                runs[name].append({"server_cpu_s": group_cpu_s(server.process.pid) - cpu,
                                   "wall_s": time.perf_counter() - start, "responses": len(responses),
                                   "tokens": len(tokens)})
    medians = {name: {k: statistics.median(r[k] for r in rounds) for k in ("server_cpu_s", "wall_s", "responses")}
               for name, rounds in runs.items()}
    every, paced = medians["every token"], medians["paced"]
    result = {"script": "bench_response_cost", "folder": args.folder, "request": REQUEST, "medians": medians,
              "response_cost_ms": round(1000 * (every["server_cpu_s"] - paced["server_cpu_s"])
                                        / (every["responses"] - paced["responses"]), 2),
              "rounds": runs, "load_average": os.getloadavg()}
    write_result(args.out, "bench_response_cost", result)
    print({k: result[k] for k in ("medians", "response_cost_ms")})


if __name__ == "__main__":
    main()
