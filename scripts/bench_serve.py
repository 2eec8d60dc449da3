#!/usr/bin/env python
"""Load test and benchmark of `ia3-export serve` (Triton through pytriton) on 127.0.0.1.

1. load: concurrent clients send requests with random adapters (bank export); throughput in
   requests/s and new tokens/s and p50/p99 latency against the SAME requests sent one at a time,
   whose answers every concurrent answer must equal;
2. mixed vs single adapter at the same batch size: waves of --wave requests sent together, each
   wave with one adapter per request or one adapter for all, timed in interleaved rounds (bank
   export: the goal is >= 0.9x; swappable export, which groups by adapter, for contrast).
Bounded: fixed request counts, a timeout per request, every server stopped. JSON goes to runs/.

    .venv-serve/bin/python scripts/bench_serve.py [--exports DIR] [--requests 96 --clients 16 --new-tokens 16]
The exports (a Llama-shaped model, hidden 256 x 4 layers, 8 adapters) are made by the full
environment ($FULL_PYTHON, default .venv/bin/python) with `bench_serve.py --prepare DIR`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from benchlib import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPTERS = [f"a{i}" for i in range(8)]  # the names bench_swap.build gives its adapters
REQUEST_TIMEOUT_S = 120


def bench_swap():
    """scripts/bench_swap.py's model builder and interleaved timer (one definition)."""
    spec = importlib.util.spec_from_file_location("bench_swap", os.path.join(ROOT, "scripts", "bench_swap.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def requests_for(count: int, new_tokens: int, seed: int = 0) -> list[dict]:
    """Random adapters (or the base model) and prompt lengths of 4..16 token ids (one bucket)."""
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(4, 300) for _ in range(rng.randint(4, 16))],
             "adapter": rng.choice([*ADAPTERS, None]), "max_new_tokens": new_tokens} for _ in range(count)]


def serve_all(url: str, requests: list[dict], clients: int) -> tuple[float, list, list[float]]:
    """(wall seconds, answers, latencies) for `requests` sent by `clients` threads."""
    from ia3_export.serve import ServeClient

    client = ServeClient(url, timeout=REQUEST_TIMEOUT_S)

    def one(request):
        t = time.perf_counter()
        answer = client.generate(**request)
        return answer, time.perf_counter() - t

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(one, requests))
    wall = time.perf_counter() - start
    client.close()  # the main thread's; the workers' connections closed with their threads
    return wall, [a for a, _ in done], [t for _, t in done]


def rates(wall: float, answers: list, latencies: list[float]) -> dict:
    tokens = sum(len(a.outputs["output_ids"]) for a in answers)
    return {"requests_per_s": len(answers) / wall, "new_tokens_per_s": tokens / wall, "wall_s": wall,
            "p50_latency_ms": float(np.percentile(latencies, 50) * 1e3),
            "p99_latency_ms": float(np.percentile(latencies, 99) * 1e3),
            "mean_batch_rows": float(np.mean([a.batch_size for a in answers]))}


def load_test(url: str, args) -> dict:
    requests = requests_for(args.requests, args.new_tokens)
    runs = {"concurrent": [], "one_at_a_time": []}
    reference = None
    for _ in range(args.repeats):  # interleaved, so both see the same machine
        for name, clients in (("concurrent", args.clients), ("one_at_a_time", 1)):
            wall, answers, latencies = serve_all(url, requests, clients)
            ids = [a.outputs["output_ids"] for a in answers]
            if reference is None:
                reference = ids
            if ids != reference:
                raise SystemExit(f"{name}: answers differ from the same requests served one at a time")
            runs[name].append(rates(wall, answers, latencies))
    out = {name: _median(rs) for name, rs in runs.items()}
    out["speedup_requests_per_s"] = out["concurrent"]["requests_per_s"] / out["one_at_a_time"]["requests_per_s"]
    out["answers_equal_one_at_a_time"] = True
    return out


def waves(url: str, args, timer) -> dict:
    """Waves of `args.wave` requests sent together: one adapter per request vs one adapter for all."""
    from ia3_export.serve import ServeClient

    client = ServeClient(url, timeout=REQUEST_TIMEOUT_S)
    prompt = full_length_prompt(client, args.new_tokens)
    rows = []

    def wave(adapters):
        def run():
            barrier = threading.Barrier(len(adapters))

            def one(adapter):
                barrier.wait()
                return client.generate(input_ids=prompt, adapter=adapter, max_new_tokens=args.new_tokens)

            with concurrent.futures.ThreadPoolExecutor(len(adapters)) as pool:
                answers = list(pool.map(one, adapters))
            assert all(len(a.outputs["output_ids"]) == args.new_tokens for a in answers)
            rows.extend(a.batch_size for a in answers)
        return run

    mixed = [ADAPTERS[i % len(ADAPTERS)] for i in range(args.wave)]
    result = timer({"single_adapter": wave([ADAPTERS[0]] * args.wave), "mixed_adapters": wave(mixed)},
                   rounds=args.rounds, warmup=2)
    paired = result.pop("paired_mixed_adapters_over_single_adapter")  # time ratios -> throughput ratios
    result["mixed_over_single_throughput"] = result["single_adapter"]["median_ms"] / result["mixed_adapters"]["median_ms"]
    result["mixed_over_single_throughput_paired"] = {"median": 1 / paired["median"], "p10": 1 / paired["p90"],
                                                     "p90": 1 / paired["p10"]}
    result["rows_per_runtime_batch"] = sorted(set(rows))
    client.close()
    return result


def full_length_prompt(client, new_tokens: int) -> list[int]:
    """A 16-token prompt after which no adapter (nor the base) stops early: both kinds of wave then run
    the same number of decode steps, and only the adapters differ."""
    rng = random.Random(1)
    for _ in range(50):
        prompt = [rng.randrange(4, 300) for _ in range(16)]
        if all(len(client.generate(input_ids=prompt, adapter=a, max_new_tokens=new_tokens).outputs["output_ids"]) == new_tokens
               for a in [*ADAPTERS, None]):
            return prompt
    raise SystemExit("no prompt found that every adapter continues to full length")


def _median(runs: list[dict]) -> dict:
    return {key: float(np.median([r[key] for r in runs])) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", metavar="DIR", help="(full environment) export the bench model to DIR and stop")
    parser.add_argument("--exports", help="a folder --prepare wrote (default: prepared now in a temporary folder)")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wave", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs"))
    args = parser.parse_args()
    swap = bench_swap()
    if args.prepare:
        swap.build(args.prepare, hidden=256, layers=4, num_adapters=len(ADAPTERS))
        return
    work = tempfile.mkdtemp(prefix="bench-serve-")
    exports = args.exports or os.path.join(work, "exports")
    if not args.exports:
        full_python = os.environ.get("FULL_PYTHON", os.path.join(ROOT, ".venv", "bin", "python"))
        subprocess.run([full_python, os.path.abspath(__file__), "--prepare", exports], check=True)
    from ia3_export.serve.process import ServerProcess

    common = ["--provider", args.provider, "--drain-timeout", "10"]
    load_options = ["--max-batch", str(args.max_batch), "--max-queue-delay-us", str(args.max_queue_delay_us), *common]
    # waves: a batch as large as a wave, so it runs the moment the wave is in (the long delay never applies)
    wave_options = ["--max-batch", str(args.wave), "--max-queue-delay-us", "100000", *common]
    result = {"what": "ia3-export serve on loopback (Triton via pytriton), Llama-shaped hidden 256 x 4 layers, "
                      f"{len(ADAPTERS)} adapters, greedy, {args.new_tokens} new tokens, prompts of 4-16 tokens",
              "args": vars(args), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                              "python": sys.version.split()[0]}}
    with ServerProcess(os.path.join(exports, "bank"), *load_options, log_path=os.path.join(work, "load.log")) as server:
        result["load_bank"] = load_test(server.url, args)
    for mode in ("bank", "swappable"):
        with ServerProcess(os.path.join(exports, mode), *wave_options, log_path=os.path.join(work, f"{mode}.log")) as server:
            result[f"waves_{mode}"] = waves(server.url, args, swap.interleaved)
    load = result["load_bank"]
    print(f"load, bank: {load['concurrent']['requests_per_s']:.1f} req/s, {load['concurrent']['new_tokens_per_s']:.0f} tok/s, "
          f"p50 {load['concurrent']['p50_latency_ms']:.0f} ms, p99 {load['concurrent']['p99_latency_ms']:.0f} ms "
          f"(one at a time: {load['one_at_a_time']['requests_per_s']:.1f} req/s, p50 {load['one_at_a_time']['p50_latency_ms']:.0f} ms); "
          f"speedup {load['speedup_requests_per_s']:.2f}x")
    for mode in ("bank", "swappable"):
        w = result[f"waves_{mode}"]
        print(f"waves of {args.wave}, {mode}: mixed/single adapter throughput {w['mixed_over_single_throughput']:.3f} "
              f"(medians; per-round pairs {w['mixed_over_single_throughput_paired']['median']:.3f}), "
              f"rows per ONNX Runtime batch seen: {w['rows_per_runtime_batch']}")
    write_result(args.out, "bench_serve", result)


if __name__ == "__main__":
    main()
