#!/usr/bin/env python
"""Continuous batching on a GPU (issue 23, deliverable 6), prepared for a lent machine; its CPU dry run
(`--provider cpu`, the serve tests' tiny folder) is tests/serve/test_gpu_serve.py.

1. engine: requests with mixed adapters and lengths, arriving while others decode, through the
   runtime's Engine on --provider: every answer must equal the same request alone on the same
   provider, and while it decodes the batch's KV cache and the adapter bank must be device values
   (OrtValue.device_name(): "cuda" on a GPU); new tokens/s;
2. server: `ia3-export serve --provider ...` (where pytriton is installed): streamed requests equal alone;
3. bench: scripts/bench_serve.py --provider ... on --bench-exports (what `bench_serve.py --prepare` wrote),
   with --bench-args passed on, under its own time limit.
Every step is bounded and reported in $OUT/gpu_serve.json (or --out); exit 1 if a check failed.

    python scripts/gpu_serve.py --folder BANK_EXPORT --provider cuda [--bench-exports DIR] [--bench-args "..."]
On the GPU machine put onnxruntime-gpu on PYTHONPATH first (../shared/gpu/README.md).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def requests_for(session, count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    adapters, vocab = [*sorted(session.adapters), None], session.folder.config.get("vocab_size", 300)
    return [{"ids": [rng.randrange(4, vocab) for _ in range(rng.randint(2, 12))], "adapter": rng.choice(adapters),
             "max_new_tokens": rng.randint(4, 32)} for _ in range(count)]


def engine_check(session, count: int) -> dict:
    """Requests 20 ms apart through a started Engine; each equal to the request alone; where the cache
    and the bank live while rows decode together."""
    from ia3_export.runtime import GenerationOptions, generate_ids
    from ia3_export.runtime.engine import Engine, Request

    requests = requests_for(session, count)
    expected = [generate_ids(session, [r["ids"]], [r["adapter"]], GenerationOptions(max_new_tokens=r["max_new_tokens"]))[0]
                for r in requests]
    engine, devices, lock = Engine(session, max_batch=8, max_queue=count), set(), threading.Lock()

    def watch(_event):  # on the engine's thread, between steps: the cache of every group decoding now
        with lock:
            devices.update(v.device_name() for g in engine.groups.values() if g.kv for v in g.kv.values())

    start, handles = time.perf_counter(), []
    with engine.start():
        for r in requests:
            options = GenerationOptions(max_new_tokens=r["max_new_tokens"])
            handles.append(engine.submit(Request(r["ids"], r["adapter"], options, timeout=300), watch))
            time.sleep(0.02)
        results = [h.result(600) for h in handles]
    seconds = time.perf_counter() - start
    bank = getattr(session.binding, "bank", None)
    bank_devices = sorted({v[0].device_name() for g in bank.values.values() for v in g.values()}) if bank else []
    wrong = [i for i, (res, exp) in enumerate(zip(results, expected)) if res.tokens != exp]
    return {"requests": count, "wrong": wrong, "finish": sorted({r.finish_reason for r in results}),
            "kv_devices": sorted(devices), "bank_devices": bank_devices,
            "new_tokens_per_s": round(sum(len(r.tokens) for r in results) / seconds, 1), "seconds": round(seconds, 2)}


def server_check(folder: str, provider: str, session, count: int) -> dict:
    """`ia3-export serve --provider`: streamed answers equal the request alone."""
    from ia3_export.runtime import GenerationOptions, generate_ids
    from ia3_export.serve import ServeClient
    from ia3_export.serve.process import ServerProcess

    requests, wrong = requests_for(session, count, seed=1), []
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(folder, "--provider", provider, "--drain-timeout", "10",
                                                             log_path=os.path.join(tmp, "server.log")) as server:
        with ServeClient(server.url) as client:
            for i, r in enumerate(requests):
                tokens = [t for e in client.stream(input_ids=r["ids"], adapter=r["adapter"], max_new_tokens=r["max_new_tokens"])
                          for t in e.get("output_ids", [])]
                options = GenerationOptions(max_new_tokens=r["max_new_tokens"])
                if tokens != generate_ids(session, [r["ids"]], [r["adapter"]], options)[0]:
                    wrong.append(i)
            stats = client.adapters("stats").get("engine")
    return {"requests": count, "wrong": wrong, "engine": stats}


def bench(exports: str, provider: str, out: str, extra: str, limit_s: int) -> dict:
    command = [sys.executable, os.path.join(ROOT, "scripts", "bench_serve.py"), "--exports", exports,
               "--provider", provider, "--out", out, *shlex.split(extra)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return {"command": command, "error": f"timed out after {limit_s} s"}
    return {"command": command, "returncode": done.returncode, "tail": (done.stdout + done.stderr)[-3000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", required=True, help="a bank export of a decoder (causal-lm) with adapters")
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--server-requests", type=int, default=6)
    parser.add_argument("--bench-exports", help="what `scripts/bench_serve.py --prepare DIR` wrote (no bench without it)")
    parser.add_argument("--bench-args", default="", help="more options for bench_serve.py, one string")
    parser.add_argument("--bench-limit", type=int, default=300, help="seconds the benchmark may take")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu-serve"))
    args = parser.parse_args()
    import onnxruntime as ort

    if args.provider == "cuda" and hasattr(ort, "preload_dlls"):  # onnxruntime-gpu finds CUDA's libraries when asked
        ort.preload_dlls()
    from ia3_export.runtime import IA3Session

    os.makedirs(args.out, exist_ok=True)
    session = IA3Session(args.folder, provider=args.provider)
    session.load_shipped_adapters()
    want = "cuda" if args.provider == "cuda" else "cpu"
    report = {"provider": args.provider, "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
              "engine": engine_check(session, args.requests)}
    e = report["engine"]
    failed = [f"engine: {len(e['wrong'])} answers differ from alone"] if e["wrong"] else []
    if e["kv_devices"] != [want] or e["bank_devices"] not in ([want], []):
        failed.append(f"engine: KV cache on {e['kv_devices']}, bank on {e['bank_devices']}, expected {want}")
    if importlib.util.find_spec("pytriton") is None:
        report["server"] = report["bench"] = "skipped: pytriton is not installed"
    else:
        report["server"] = server_check(args.folder, args.provider, session, args.server_requests)
        failed += [f"server: {len(report['server']['wrong'])} answers differ from alone"] if report["server"]["wrong"] else []
        if args.bench_exports:
            report["bench"] = bench(args.bench_exports, args.provider, args.out, args.bench_args, args.bench_limit)
            failed += ["bench: failed"] if report["bench"].get("returncode") != 0 else []
    report["failed"] = failed
    with open(os.path.join(args.out, "gpu_serve.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
