#!/usr/bin/env python
"""Load test and benchmark of `ia3-export serve` (Triton through pytriton) on 127.0.0.1.

1. load: concurrent clients send requests with random adapters (bank export); throughput in
   requests/s and new tokens/s and p50/p99 latency against the SAME requests sent one at a time,
   whose answers every concurrent answer must equal;
2. mixed vs single adapter at the same batch size: waves of --wave requests sent together, each
   wave with one adapter per request or one adapter for all, timed in interleaved rounds (bank
   export: the goal is >= 0.9x; swappable export, which groups by adapter, for contrast);
3. sweep: open-loop Poisson arrivals at each rate of --rates (as vLLM's benchmark_serving.py), the
   same seeded requests (prompts of 4-16 ids, 8-128 new tokens, mixed adapters) sent to two servers,
   `--batching continuous` (streamed: generate_stream) and `--batching request` (generate), with
   TTFT, TPOT, ITL, end-to-end latency and throughput per rate, the issue's goals as PASS/FAIL,
   every answer of one mode equal to the other's (on the traced bank export, or with
   `--sweep-export fused-bank` on the `--graph fused` one);
4. openai: the same continuous workload through /v1/completions (streamed) against generate_stream;
5. genai: our runtime Engine (in-process) against onnxruntime-genai's Engine on a fused merged export,
   same requests and arrivals (run by the full environment: `--genai-anchor DIR`).
Bounded: fixed request counts, a timeout per request, every server stopped. JSON goes to runs/.

    .venv-serve/bin/python scripts/bench_serve.py [--exports DIR] [--sections load,waves,sweep,openai,genai]
The exports (a Llama-shaped model, hidden 256 x 4 layers, 8 adapters; fused merged and bank ones) are made by
the full environment ($FULL_PYTHON, default .venv/bin/python) with `bench_serve.py --prepare DIR`;
`--plot JSON` (full environment: matplotlib) draws a sweep's latency against request rate.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import numpy as np
from benchlib import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPTERS = [f"a{i}" for i in range(8)]  # the names bench_swap.build gives its adapters
BASE_NAME = "base"  # the base model's id in /v1/models (--served-model-name)
FUSED = "fused-merged"  # the fused graph, a0 folded in: the onnxruntime-genai anchor's folder
FUSED_BANK = "fused-bank"  # the fused graph with every adapter as a bank: --sweep-export, bench_serve_cpu.py
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


# -- the open-loop sweep (vLLM's benchmark_serving.py: Poisson arrivals, TTFT, TPOT, ITL, e2e) -----------

def sweep_requests(count: int, seed: int, adapters: list | None = None) -> list[dict]:
    """Prompts of 4..16 random ids, 8..128 new tokens, each on a random adapter of `adapters` (default:
    the 8 and the base model). Greedy, so the same request always gets the same tokens (an EOS may end
    one early: what is reported is the tokens actually generated)."""
    rng = random.Random(seed)
    adapters = [*ADAPTERS, None] if adapters is None else adapters
    return [{"input_ids": [rng.randrange(4, 300) for _ in range(rng.randint(4, 16))],
             "adapter": rng.choice(adapters), "max_new_tokens": rng.randint(8, 128)} for _ in range(count)]


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: exponential gaps at `rate` per second
    (inf: all at once)."""
    if math.isinf(rate):
        return [0.0] * count
    rng, t, times = random.Random(seed), 0.0, []
    for _ in range(count):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def open_loop(send, requests: list[dict], arrivals: list[float]) -> dict:
    """Each request on its own thread at its arrival time, never waiting for earlier ones. `send(request)`
    returns (token ids, [seconds from its start to each response that carried tokens]); a request's
    TTFT is its first response, e2e its last. Returns per-request records and the run's wall time."""
    records = [None] * len(requests)

    def one(i):
        start = time.perf_counter()
        try:
            tokens, times = send(requests[i])
            records[i] = {"tokens": tokens, "times": times, "sent": start}
        except Exception as e:  # noqa: BLE001 - a failed request is counted, the run goes on
            records[i] = {"error": " ".join(str(e).split())[:300], "sent": start}
        records[i]["end"] = time.perf_counter()

    threads, start = [], time.perf_counter()
    for i, at in enumerate(arrivals):
        wait = start + at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        threads.append(threading.Thread(target=one, args=(i,), daemon=True))
        threads[-1].start()
    for thread in threads:
        thread.join(max(1.0, start + arrivals[-1] + REQUEST_TIMEOUT_S - time.perf_counter()))
    records = [r or {"error": f"no answer within {REQUEST_TIMEOUT_S} s", "sent": start, "end": time.perf_counter()}
               for r in records]
    return {"records": records, "wall_s": max(r["end"] for r in records) - start}


def streamed(url: str, field: str = "output_ids"):
    """send() through generate_stream (continuous batching), a time per response: the token ids, or with
    field="text" the text pieces (to compare with the OpenAI-compatible front's)."""
    from ia3_export.serve import ServeClient

    client = ServeClient(url, timeout=REQUEST_TIMEOUT_S)

    def send(request):
        got, times, start = [], [], time.perf_counter()
        for event in client.stream(**request):
            if event.get(field):
                got += event[field] if field == "output_ids" else [event[field]]
                times.append(time.perf_counter() - start)
        return got, times
    return send


def whole(url: str):
    """send() through generate (request batching): one answer, so TTFT = e2e."""
    from ia3_export.serve import ServeClient

    client = ServeClient(url, timeout=REQUEST_TIMEOUT_S)

    def send(request):
        start = time.perf_counter()
        tokens = list(client.generate(**request).outputs["output_ids"])
        elapsed = time.perf_counter() - start
        client.close()  # this thread's connection (one thread per request)
        return tokens, [elapsed]
    return send


def openai_streamed(url: str, base: str):
    """send() through the OpenAI-compatible /v1/completions, streamed: the text pieces (Server-Sent Events
    read by the same code as ServeClient.stream's, so only the server side differs)."""
    from ia3_export.serve.client import server_sent_events

    parsed = urllib.parse.urlsplit(url)

    def send(request):
        body = {"model": request["adapter"] or base, "prompt": request["input_ids"],
                "max_tokens": request["max_new_tokens"], "stream": True}
        pieces, times, start = [], [], time.perf_counter()
        for event in server_sent_events(parsed.hostname, parsed.port, "/v1/completions", body, REQUEST_TIMEOUT_S):
            if "error" in event:
                raise RuntimeError(event["error"])
            text = event["choices"][0]["text"]
            if text:
                pieces.append(text)
                times.append(time.perf_counter() - start)
        return pieces, times
    return send


def metrics(run: dict) -> dict:
    """TTFT, TPOT ((e2e - ttft) / (tokens - 1); streamed requests only: a whole answer has none), ITL (gaps
    between responses, as vLLM's chunks), e2e: p50/p99 in ms; throughput over the run (start to last answer)."""
    ok = [r for r in run["records"] if "error" not in r]
    ttft = [r["times"][0] for r in ok if r["times"]]
    e2e = [r["end"] - r["sent"] for r in ok]
    tokens = [len(r["tokens"]) for r in ok]
    tpot = [(r["end"] - r["sent"] - r["times"][0]) / (n - 1) for r, n in zip(ok, tokens) if n > 1 and len(r["times"]) > 1]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]

    def pct(values):
        return {"p50": _ms(values, 50), "p99": _ms(values, 99)} if values else None

    return {"ttft_ms": pct(ttft), "tpot_ms": pct(tpot), "itl_ms": pct(itl), "e2e_ms": {**pct(e2e), "mean": _ms(e2e, None)},
            "completed": len(ok), "errors": len(run["records"]) - len(ok),
            "error_examples": sorted({r["error"] for r in run["records"] if "error" in r})[:3],
            "new_tokens": sum(tokens), "mean_new_tokens": float(np.mean(tokens)) if tokens else 0.0,
            "new_tokens_per_s": sum(tokens) / run["wall_s"], "requests_per_s": len(ok) / run["wall_s"],
            "wall_s": run["wall_s"]}


def _ms(values, q) -> float:
    return round(float(np.mean(values) if q is None else np.percentile(values, q)) * 1e3, 1)


def answers(run: dict) -> list:
    return [r.get("tokens") for r in run["records"]]


def mismatches(a: list, b: list) -> list[int]:
    """Indices of requests both runs answered but differently."""
    return [i for i, (x, y) in enumerate(zip(a, b)) if x is not None and y is not None and x != y]


def sweep(servers: dict, args) -> dict:
    """Every rate: the same requests to both servers (continuous, then request), open loop; one at a time
    first (the unloaded latency, and each request's answer alone); each rate's longest answer alone on the
    continuous server (the p99 goal's floor); saturation rounds at inf, with a single-adapter run on the
    continuous server."""
    send = {"continuous": streamed(servers["continuous"]), "request": whole(servers["request"])}
    rates = [float(r) for r in args.rates.split(",")]
    out = {"rates": args.rates.split(","), "requests_per_rate": args.sweep_requests, "by_rate": {}, "mismatched": []}
    for mode in send:  # warm-up: each server's first requests pay one-time costs
        open_loop(send[mode], sweep_requests(8, seed=999), [0.0] * 8)
    base_requests, longest = sweep_requests(args.sweep_requests, seed=100), {}
    alone = one_at_a_time(send["request"], base_requests[:args.unloaded_requests])
    out["unloaded_request"] = metrics(alone)
    reference = answers(alone)
    for k, rate in enumerate(rates):
        requests = sweep_requests(args.sweep_requests, seed=100 + k)
        arrivals = poisson_arrivals(len(requests), rate, seed=200 + k)
        runs = {mode: open_loop(send[mode], requests, arrivals) for mode in send}
        name = out["rates"][k]
        out["by_rate"][name] = {mode: metrics(run) for mode, run in runs.items()}
        out["by_rate"][name]["offered_requests_per_s"] = rate if not math.isinf(rate) else None
        bad = mismatches(answers(runs["continuous"]), answers(runs["request"]))
        if k == 0:  # the first rate's requests are those sent one at a time: both modes equal them alone
            bad += [i for i, t in enumerate(reference) for mode in runs if answers(runs[mode])[i] not in (None, t)]
        out["mismatched"] += [f"rate {name}, request {i}" for i in sorted(set(bad))]
        got = answers(runs["continuous"])
        longest[name] = requests[max(range(len(requests)), key=lambda i: len(got[i] or []))]
        row = out["by_rate"][name]
        print(f"rate {name:>4}: " + "; ".join(
            f"{mode} TTFT p50 {row[mode]['ttft_ms']['p50']:.0f} ms, e2e p50/p99 {row[mode]['e2e_ms']['p50']:.0f}/"
            f"{row[mode]['e2e_ms']['p99']:.0f} ms, {row[mode]['new_tokens_per_s']:.0f} tok/s, {row[mode]['errors']} errors"
            for mode in send), flush=True)
    # the p99 goal's floor: no load makes a request faster than alone, so the continuous server's p99 at a rate
    # (between its two slowest answers) can hardly be below its longest answer's time alone (median of 3)
    out["longest_alone_ms"] = {name: metrics(one_at_a_time(send["continuous"], [request] * 3))["e2e_ms"]["p50"]
                               for name, request in longest.items()}
    out["saturation"] = saturation({**send, "continuous_generate": whole(servers["continuous"])}, args)
    return out


def one_at_a_time(send, requests: list[dict]) -> dict:
    records, start = [], time.perf_counter()
    for request in requests:
        run = open_loop(send, [request], [0.0])
        records += run["records"]
    return {"records": records, "wall_s": time.perf_counter() - start}


PAIRED = {"continuous_over_request": ("continuous", "request"),  # the saturation goal's ratios
          "mixed_over_single_adapter": ("continuous", "continuous_single_adapter")}


def saturation(send: dict, args) -> dict:
    """Rounds at rate inf: continuous and request on the mixed requests, continuous on the same requests
    all on one adapter, and the continuous server's non-streamed `generate` (the same engine without a
    response per step: what streaming costs); medians of the rounds (this machine's noise is +-30% per run),
    and the goals' ratios paired within each round (its cases run back to back, in an order that rotates
    from round to round: with mixed adapters always first they measured 0.92x one adapter in one run, and
    1.05x in a probe that alternated the two), then their median: a
    round that ran slow for every case counts as one round, not as a slow case."""
    mixed = sweep_requests(args.sweep_requests, seed=300)
    single = [{**r, "adapter": ADAPTERS[0]} for r in mixed]
    at_once = [0.0] * len(mixed)
    cases = {"continuous": (send["continuous"], mixed), "request": (send["request"], mixed),
             "continuous_single_adapter": (send["continuous"], single),
             "continuous_not_streamed": (send["continuous_generate"], mixed)}
    rounds, names = {name: [] for name in cases}, list(cases)
    for i in range(args.saturation_rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:  # each case first in turn: no order bias
            fn, requests = cases[name]
            rounds[name].append(metrics(open_loop(fn, requests, at_once)))
    out = {name: {key: float(np.median([m[key] for m in ms])) for key in ("new_tokens_per_s", "requests_per_s", "errors")}
           | {"rounds_new_tokens_per_s": [round(m["new_tokens_per_s"], 1) for m in ms]} for name, ms in rounds.items()}
    out["paired"] = {name: float(np.median([a / b for a, b in zip(out[top]["rounds_new_tokens_per_s"],
                                                                  out[bottom]["rounds_new_tokens_per_s"])]))
                     for name, (top, bottom) in PAIRED.items()}
    return out


def goals(result: dict) -> list[dict]:
    """The issue's goals, computed from the run (whatever they say)."""
    sweep_ = result["sweep"]
    unloaded = sweep_["unloaded_request"]["e2e_ms"]["p50"]
    loaded = next((name for name, row in sweep_["by_rate"].items()
                   if row["request"]["e2e_ms"]["p99"] >= 3 * unloaded), None)
    out = []
    if loaded is None:
        out.append({"goal": "a rate where request batching's p99 e2e >= 3x its unloaded p50", "pass": False,
                    "numbers": f"unloaded p50 {unloaded:.0f} ms; no rate of the sweep reached 3x"})
    else:
        row = sweep_["by_rate"][loaded]
        request_p99 = row["request"]["e2e_ms"]["p99"]
        p99 = row["continuous"]["e2e_ms"]["p99"] / request_p99
        ttft = row["continuous"]["ttft_ms"]["p50"] / row["request"]["ttft_ms"]["p50"]
        where = (f"at rate {loaded} (request p99 e2e {request_p99:.0f} ms = {request_p99 / unloaded:.1f}x its "
                 f"unloaded p50 {unloaded:.0f} ms)")
        p99_goal = {"goal": "continuous p99 e2e <= 0.5x request batching's", "pass": p99 <= 0.5, "ratio": round(p99, 3),
                    "numbers": f"{row['continuous']['e2e_ms']['p99']:.0f} vs {request_p99:.0f} ms {where}"}
        first = next(iter(sweep_["by_rate"]))
        nearly_alone = sweep_["by_rate"][first]["continuous"]["e2e_ms"]["p99"]  # with a lone request's own tail
        p99_goal["numbers"] += (f"; continuous p99 at rate {first}, nearly unloaded: {nearly_alone:.0f} ms = "
                                f"{nearly_alone / request_p99:.2f}x")
        alone = sweep_.get("longest_alone_ms", {}).get(loaded)
        if alone is not None:  # what no load can beat: the rate's longest request alone (its median)
            p99_goal["floor_ratio"] = round(alone / request_p99, 3)
            p99_goal["numbers"] += (f"; floor: its longest request alone on the continuous server {alone:.0f} ms = "
                                    f"{alone / request_p99:.2f}x"
                                    + (", over the goal before any load" if alone > 0.5 * request_p99 else ""))
        out.append(p99_goal)
        out.append({"goal": "continuous median TTFT <= 0.2x request batching's", "pass": ttft <= 0.2, "ratio": round(ttft, 3),
                    "numbers": f"{row['continuous']['ttft_ms']['p50']:.0f} vs {row['request']['ttft_ms']['p50']:.0f} ms {where}"})
    sat = sweep_["saturation"]
    for goal, pair, floor in (("saturation throughput (rate inf) continuous >= 1.3x request", "continuous_over_request", 1.3),
                              ("mixed adapters >= 0.95x single-adapter throughput at saturation (continuous)",
                               "mixed_over_single_adapter", 0.95)):
        top, bottom = (sat[case]["new_tokens_per_s"] for case in PAIRED[pair])
        ratio = sat.get("paired", {}).get(pair, top / bottom)  # older runs: the medians' ratio
        out.append({"goal": goal, "pass": ratio >= floor, "ratio": round(ratio, 3),
                    "numbers": f"median of the per-round ratios {ratio:.2f}; medians {top:.0f} vs {bottom:.0f} new "
                               f"tokens/s ({top / bottom:.2f}x)"})
    if "genai" in result and result["genai"].get("ratio") is not None:
        g = result["genai"]
        out.append({"goal": "fused merged export: tokens/s within 1.10x of onnxruntime-genai's Engine",
                    "pass": g["ratio"] >= 1 / 1.10, "ratio": round(g["ratio"], 3), "numbers": g["summary"]})
    return out


def openai_overhead(url: str, openai_url: str, args) -> dict:
    """The same continuous workload at --openai-rate through generate_stream and through /v1/completions
    (streamed), interleaved rounds; the texts must be equal."""
    requests = sweep_requests(args.sweep_requests, seed=400)
    arrivals = poisson_arrivals(len(requests), args.openai_rate, seed=401)
    cases = {"generate_stream": streamed(url, "text"), "openai_completions": openai_streamed(openai_url, BASE_NAME)}
    runs = {name: [] for name in cases}
    mismatched = 0
    for _ in range(args.openai_rounds):
        texts = {}
        for name, send in cases.items():
            run = open_loop(send, requests, arrivals)
            runs[name].append(metrics(run))
            texts[name] = ["".join(t) if t is not None else None for t in answers(run)]
        mismatched += len(mismatches(texts["generate_stream"], texts["openai_completions"]))
    out = {"rate": args.openai_rate, "requests": len(requests), "rounds": args.openai_rounds,
           "texts_mismatched": mismatched}
    for name, ms in runs.items():
        out[name] = {"ttft_p50_ms": float(np.median([m["ttft_ms"]["p50"] for m in ms])),
                     "e2e_p50_ms": float(np.median([m["e2e_ms"]["p50"] for m in ms])),
                     "e2e_p99_ms": float(np.median([m["e2e_ms"]["p99"] for m in ms])),
                     "errors": sum(m["errors"] for m in ms)}
    for key in ("ttft_p50_ms", "e2e_p50_ms"):
        out[f"ratio_{key}"] = round(out["openai_completions"][key] / out["generate_stream"][key], 3)
    return out


# -- the onnxruntime-genai anchor (full environment: both engines in this process) ------------------------

def genai_anchor(folder: str, args) -> dict:
    """Our runtime Engine and onnxruntime-genai's Engine on the same fused merged folder, the same base-model
    requests (exact lengths: our EOS off, genai's min = max generated tokens) at the same arrivals,
    interleaved rounds at --genai-rate and at inf; tokens/s over the makespan, TTFT, e2e."""
    requests = sweep_requests(args.genai_requests, seed=500, adapters=[None])
    out = {"folder": os.path.basename(folder), "requests": len(requests), "max_batch": args.max_batch, "by_rate": {}}
    ours, theirs = our_engine(folder, args.max_batch), genai_engine(folder, args.max_batch)
    if isinstance(theirs, str):
        return {**out, "ratio": None, "unavailable": theirs}
    for rate in (args.genai_rate, math.inf):
        arrivals = poisson_arrivals(len(requests), rate, seed=501)
        rounds = {"ours": [], "onnxruntime_genai": []}
        for _ in range(args.genai_rounds):
            for name, run in (("ours", ours), ("onnxruntime_genai", theirs)):
                rounds[name].append(run(requests, arrivals))
        same = sum(a == b for a, b in zip(rounds["ours"][0]["tokens"], rounds["onnxruntime_genai"][0]["tokens"]))
        row = {name: {key: float(np.median([r[key] for r in rs])) for key in ("tokens_per_s", "ttft_p50_ms", "e2e_p50_ms",
                                                                                 "e2e_p99_ms")}
               for name, rs in rounds.items()}
        row["answers_equal"] = f"{same}/{len(requests)}"
        row["ratio_tokens_per_s"] = round(row["ours"]["tokens_per_s"] / row["onnxruntime_genai"]["tokens_per_s"], 3)
        out["by_rate"]["inf" if math.isinf(rate) else str(rate)] = row
    sat = out["by_rate"]["inf"]
    out["ratio"] = sat["ratio_tokens_per_s"]
    out["summary"] = (f"at rate inf: ours {sat['ours']['tokens_per_s']:.0f} vs onnxruntime-genai "
                      f"{sat['onnxruntime_genai']['tokens_per_s']:.0f} new tokens/s")
    return out


def our_engine(folder: str, max_batch: int):
    from ia3_export.runtime import Engine, GenerationOptions, IA3Session, Request, Result

    session = IA3Session(folder)

    def run(requests, arrivals):
        n = len(requests)
        first, done, handles, finished = [None] * n, [None] * n, [], threading.Semaphore(0)

        def on_event(i):
            def record(event):
                now = time.perf_counter()
                first[i] = first[i] or now
                if isinstance(event, Result):
                    done[i] = now
                    finished.release()
            return record

        with Engine(session, max_batch=max_batch, max_queue=n) as engine:
            start = time.perf_counter()
            for i, (r, at) in enumerate(zip(requests, arrivals)):
                time.sleep(max(0.0, start + at - time.perf_counter()))
                handles.append(engine.submit(Request(r["input_ids"], None, GenerationOptions(
                    max_new_tokens=r["max_new_tokens"], eos_token_ids=[])), on_event=on_event(i)))
            for _ in range(n):
                finished.acquire()
        return engine_summary(requests, arrivals, start, first, done, [h.result().tokens for h in handles])
    return run


def genai_engine(folder: str, max_batch: int):
    """onnxruntime-genai 0.18's Engine, driven from one thread: requests begin their turn when they have
    arrived, between `run()` steps. Its dynamic (continuous) batching needs the builder's paged KV cache
    (CUDA fp16/bf16 graphs); on this CPU fp32 graph it runs its static engine, configured to `max_batch`."""
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        return f"onnxruntime-genai is not installed ({e})"
    config = og.Config(folder)
    config.overlay(json.dumps({"engine": {"static_batching": {"max_batch_size": max_batch}}}))
    try:
        engine = og.Engine(og.Model(config))
    except RuntimeError as e:
        return f"onnxruntime-genai's Engine cannot run this folder: {' '.join(str(e).split())}"
    buffer = engine.create_event_buffer(4 * max_batch)

    def run(requests, arrivals):
        n = len(requests)
        first, done, tokens, index = [None] * n, [None] * n, [[] for _ in range(n)], {}
        start, begun = time.perf_counter(), 0
        while begun < n or engine.has_pending_requests():
            now = time.perf_counter()
            while begun < n and start + arrivals[begun] <= now:
                r = requests[begun]
                request = engine.create_request()
                turn = og.TurnOptions(request)
                turn.set_max_generated_tokens(r["max_new_tokens"])
                turn.set_min_generated_tokens(r["max_new_tokens"])
                request.begin_turn(np.array(r["input_ids"], np.int32), turn)
                index[id(request)] = (begun, request)
                begun += 1
            if not engine.has_pending_requests():
                time.sleep(max(0.0, start + arrivals[begun] - time.perf_counter()))
                continue
            for event in engine.run(buffer):
                i, request = index[id(event.request)]
                now = time.perf_counter()
                if event.flags & og.EngineEventFlags.TOKEN:
                    tokens[i].append(int(event.token))
                    first[i] = first[i] or now
                if event.finish_reason != og.FinishReason.NONE:
                    done[i] = now
                    request.close()
        return engine_summary(requests, arrivals, start, first, done, tokens)
    return run


def engine_summary(requests, arrivals, start, first, done, tokens) -> dict:
    ttft = [f - (start + a) for f, a in zip(first, arrivals)]
    e2e = [d - (start + a) for d, a in zip(done, arrivals)]
    return {"tokens_per_s": sum(len(t) for t in tokens) / (max(done) - start), "ttft_p50_ms": _ms(ttft, 50),
            "e2e_p50_ms": _ms(e2e, 50), "e2e_p99_ms": _ms(e2e, 99), "tokens": tokens}


def markdown(result: dict) -> str:
    """The sweep as docs/serving.md's table."""
    lines = ["| rate (req/s) | mode | TTFT p50 / p99 ms | TPOT p50 / p99 ms | e2e p50 / p99 ms | new tokens/s | req/s | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in result["sweep"]["by_rate"].items():
        for mode in ("continuous", "request"):
            m = row[mode]
            tpot = f"{m['tpot_ms']['p50']:.1f} / {m['tpot_ms']['p99']:.1f}" if m["tpot_ms"] else "-"
            lines.append(f"| {name} | {mode} | {m['ttft_ms']['p50']:,.0f} / {m['ttft_ms']['p99']:,.0f} | {tpot} | "
                         f"{m['e2e_ms']['p50']:,.0f} / {m['e2e_ms']['p99']:,.0f} | {m['new_tokens_per_s']:,.0f} | "
                         f"{m['requests_per_s']:.2f} | {m['errors']} |")
    return "\n".join(lines)


def plot(path: str, png: str) -> None:
    """p99 end-to-end latency and median TTFT against the offered request rate, both modes (inf at the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        run = json.load(f)
    sweep_, export = run["sweep"], run["args"].get("sweep_export", "bank")
    names = list(sweep_["by_rate"])
    x = list(range(len(names)))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, q, title) in zip(axes, (("e2e_ms", "p99", "p99 end-to-end latency"), ("ttft_ms", "p50", "median time to first token"))):
        for mode, style in (("continuous", "o-"), ("request", "s--")):
            ax.plot(x, [sweep_["by_rate"][n][mode][key][q] for n in names], style, label=f"--batching {mode}")
        ax.set_xticks(x, names)
        ax.set_yscale("log")
        ax.set_xlabel("request rate (requests/s, Poisson; inf: all at once)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"ia3-export serve, {export} export, 8 adapters + base, {sweep_['requests_per_rate']} requests per rate, 8-128 new tokens")
    fig.tight_layout()
    os.makedirs(os.path.dirname(png), exist_ok=True)
    fig.savefig(png, dpi=110)
    print("wrote", png)


def _median(runs: list[dict]) -> dict:
    return {key: float(np.median([r[key] for r in runs])) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", metavar="DIR", help="(full environment) export the bench model to DIR and stop")
    parser.add_argument("--plot", metavar="JSON", help="(full environment) plot a sweep's JSON to docs/serving/ and stop")
    parser.add_argument("--genai-anchor", metavar="DIR", help="(full environment) run the genai section on DIR; JSON to stdout")
    parser.add_argument("--exports", help="a folder --prepare wrote (default: prepared now in a temporary folder)")
    parser.add_argument("--sections", default="load,waves,sweep,openai,genai")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wave", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--sweep-export", default="bank", choices=["bank", FUSED_BANK],
                        help="sweep/openai: the export both servers serve (--prepare writes both; fused-bank: --graph fused)")
    parser.add_argument("--rates", default="1,2,4,8,12,16,24,32,inf", help="sweep: requests per second (inf: all at once)")
    parser.add_argument("--sweep-requests", type=int, default=40, help="sweep: requests per rate")
    parser.add_argument("--unloaded-requests", type=int, default=16, help="sweep: requests sent one at a time")
    parser.add_argument("--saturation-rounds", type=int, default=7)
    parser.add_argument("--openai-rate", type=float, default=4.0)
    parser.add_argument("--openai-rounds", type=int, default=2)
    parser.add_argument("--genai-rate", type=float, default=8.0)
    parser.add_argument("--genai-requests", type=int, default=32)
    parser.add_argument("--genai-rounds", type=int, default=2)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs"))
    parser.add_argument("--docs", action="store_true", help="also write docs/serving/bench_serve_sweep.json and .png")
    args = parser.parse_args()
    if args.prepare:
        bench_swap().build(args.prepare, hidden=256, layers=4, num_adapters=len(ADAPTERS))
        from ia3_export.export import export_model

        export_model(os.path.join(args.prepare, "base"), os.path.join(args.prepare, FUSED), mode="merged",
                     adapters=[os.path.join(args.prepare, ADAPTERS[0])], graph="fused")
        export_model(os.path.join(args.prepare, "base"), os.path.join(args.prepare, FUSED_BANK), mode="bank",
                     adapters=[os.path.join(args.prepare, a) for a in ADAPTERS], graph="fused")
        return
    if args.plot:
        plot(args.plot, os.path.splitext(args.plot)[0] + ".png")
        return
    if args.genai_anchor:
        print(json.dumps(genai_anchor(args.genai_anchor, args)))
        return
    sections = set(args.sections.split(","))
    work = tempfile.mkdtemp(prefix="bench-serve-")
    exports = args.exports or os.path.join(work, "exports")
    full_python = os.environ.get("FULL_PYTHON", os.path.join(ROOT, ".venv", "bin", "python"))
    if not args.exports:
        subprocess.run([full_python, os.path.abspath(__file__), "--prepare", exports], check=True)
    from ia3_export.serve.process import ServerProcess, free_ports

    common = ["--provider", args.provider, "--drain-timeout", "10"]
    load_options = ["--max-batch", str(args.max_batch), "--max-queue-delay-us", str(args.max_queue_delay_us), *common]
    # waves: a batch as large as a wave, so it runs the moment the wave is in (the long delay never applies)
    wave_options = ["--max-batch", str(args.wave), "--max-queue-delay-us", "100000", *common]
    result = {"what": "ia3-export serve on loopback (Triton via pytriton), Llama-shaped hidden 256 x 4 layers, "
                      f"{len(ADAPTERS)} adapters, greedy; load/waves: {args.new_tokens} new tokens; sweep: 8-128 new "
                      "tokens; prompts of 4-16 tokens",
              "args": vars(args), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                              "python": sys.version.split()[0],
                                              "load_average_at_start": os.getloadavg()}}
    if "load" in sections:
        with ServerProcess(os.path.join(exports, "bank"), "--batching", "request", *load_options,
                           log_path=os.path.join(work, "load.log")) as server:
            result["load_bank"] = load_test(server.url, args)
        load = result["load_bank"]
        print(f"load, bank: {load['concurrent']['requests_per_s']:.1f} req/s, {load['concurrent']['new_tokens_per_s']:.0f} tok/s, "
              f"p50 {load['concurrent']['p50_latency_ms']:.0f} ms, p99 {load['concurrent']['p99_latency_ms']:.0f} ms "
              f"(one at a time: {load['one_at_a_time']['requests_per_s']:.1f} req/s, p50 {load['one_at_a_time']['p50_latency_ms']:.0f} ms); "
              f"speedup {load['speedup_requests_per_s']:.2f}x")
    if "waves" in sections:
        for mode in ("bank", "swappable"):
            with ServerProcess(os.path.join(exports, mode), "--batching", "request", *wave_options,
                               log_path=os.path.join(work, f"{mode}.log")) as server:
                result[f"waves_{mode}"] = waves(server.url, args, bench_swap().interleaved)
            w = result[f"waves_{mode}"]
            print(f"waves of {args.wave}, {mode}: mixed/single adapter throughput {w['mixed_over_single_throughput']:.3f} "
                  f"(medians; per-round pairs {w['mixed_over_single_throughput_paired']['median']:.3f}), "
                  f"rows per ONNX Runtime batch seen: {w['rows_per_runtime_batch']}")
    if sections & {"sweep", "openai"}:
        openai_port = free_ports(1)[0] if "openai" in sections else None
        served = os.path.join(exports, args.sweep_export)
        if not os.path.isdir(served):
            raise SystemExit(f"{served} is missing; prepare the exports again (--prepare DIR) or pick another --sweep-export")
        with ServerProcess(served, "--batching", "continuous", *load_options,
                           *(["--openai-port", str(openai_port), "--served-model-name", BASE_NAME] if openai_port else []),
                           log_path=os.path.join(work, "continuous.log")) as continuous, \
             ServerProcess(served, "--batching", "request", *load_options,
                           log_path=os.path.join(work, "request.log")) as request:
            if "sweep" in sections:
                result["sweep"] = sweep({"continuous": continuous.url, "request": request.url}, args)
            if openai_port:
                result["openai"] = openai_overhead(continuous.url, f"http://127.0.0.1:{openai_port}", args)
                o = result["openai"]
                print(f"OpenAI front at {o['rate']} req/s: TTFT p50 {o['openai_completions']['ttft_p50_ms']:.0f} vs "
                      f"{o['generate_stream']['ttft_p50_ms']:.0f} ms ({o['ratio_ttft_p50_ms']:.2f}x), e2e p50 "
                      f"{o['openai_completions']['e2e_p50_ms']:.0f} vs {o['generate_stream']['e2e_p50_ms']:.0f} ms "
                      f"({o['ratio_e2e_p50_ms']:.2f}x); texts mismatched: {o['texts_mismatched']}")
    if "genai" in sections:
        answer = subprocess.run([full_python, os.path.abspath(__file__), "--genai-anchor", os.path.join(exports, FUSED),
                                 "--max-batch", str(args.max_batch), "--genai-rate", str(args.genai_rate),
                                 "--genai-requests", str(args.genai_requests), "--genai-rounds", str(args.genai_rounds)],
                                check=True, capture_output=True, text=True, timeout=600)
        result["genai"] = json.loads(answer.stdout.strip().splitlines()[-1])
        print("genai anchor:", {k: v for k, v in result["genai"].items() if k != "by_rate"})
    if "sweep" in sections:
        print(markdown(result))
        result["goals"] = goals(result)
        for goal in result["goals"]:
            print(f"{'PASS' if goal['pass'] else 'FAIL'}: {goal['goal']}: {goal.get('ratio', '')} ({goal['numbers']})")
    result["machine"]["load_average_at_end"] = os.getloadavg()
    path = write_result(args.out, "bench_serve", result)
    if args.docs:
        suffix = "" if args.sweep_export == "bank" else f"-{args.sweep_export}"
        docs = write_result(os.path.join(ROOT, "docs", "serving"), f"bench_serve_sweep{suffix}", result, stamp=False)
        subprocess.run([full_python, os.path.abspath(__file__), "--plot", docs], check=True)
    mismatched = result.get("sweep", {}).get("mismatched", []) + (["openai texts"] if result.get("openai", {}).get("texts_mismatched") else [])
    if mismatched:
        raise SystemExit(f"answers differ between modes ({path}): {mismatched[:10]}")


if __name__ == "__main__":
    main()
