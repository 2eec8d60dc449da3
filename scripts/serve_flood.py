#!/usr/bin/env python
"""Many concurrent requests against `ia3-export serve` on loopback (issue 23, faults): every answer
must equal the same request run alone, or be refused `busy: ...` (past --max-queue); the server's
memory (RSS of its whole process group: the command, tritonserver, the backend stubs, from /proc)
is sampled before, during and after, and must stay bounded.

Half the requests stream (`generate_stream`, Server-Sent Events), half do not (`generate`); with
`--openai`, half of each go through the OpenAI-compatible API instead (`/v1/completions`, streamed
and not; its answer is text, compared with the tokens alone decoded). All are sent at once from one
asyncio loop (httpx), mixed adapters, 4-24 new tokens. Bounded: a timeout per request, the server
stopped at the end. tests/serve/test_engine_faults.py runs 200 of them.

    .venv-serve/bin/python scripts/serve_flood.py EXPORTS_DIR [--requests 1000 --max-queue 256 --openai]
EXPORTS_DIR: what tests/serve/prepare.py wrote (llama-bank with adapters llama-a1, llama-a2).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import threading
import time

REQUEST_TIMEOUT_S = 300


def group_rss_kib(pgid: int) -> int:
    """Resident memory of every process in the process group `pgid` (KiB), from /proc."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            with open(f"/proc/{pid}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError):
            pass  # the process ended meanwhile
    return total


def requests_for(count: int, adapters: list, seed: int = 0, openai: bool = False) -> list[dict]:
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(4, 300) for _ in range(rng.randint(2, 12))], "adapter": rng.choice(adapters),
             "max_new_tokens": rng.randint(4, 24), "stream": i % 2 == 0, "openai": openai and i % 4 >= 2}
            for i in range(count)]


async def _stream(client, url: str, r: dict) -> tuple[list[int], str]:
    body = {"input_ids": r["input_ids"], "adapter": r["adapter"] or "", "max_new_tokens": r["max_new_tokens"]}
    tokens, error = [], ""
    async with client.stream("POST", f"{url}/v2/models/generate_stream/generate_stream", json=body) as response:
        if response.status_code != 200:
            return [], f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                error = error or event.get("error", "")
                ids = event.get("output_ids", [])
                tokens += ids if isinstance(ids, list) else [ids]  # one token arrives as a number
    return tokens, error


async def _generate(client, url: str, r: dict) -> tuple[list[int], str]:
    ids = r["input_ids"]
    inputs = [{"name": "input_ids", "datatype": "INT64", "shape": [1, len(ids)], "data": ids},
              {"name": "adapter", "datatype": "BYTES", "shape": [1, 1], "data": [r["adapter"] or ""]},
              {"name": "max_new_tokens", "datatype": "INT32", "shape": [1, 1], "data": [r["max_new_tokens"]]}]
    response = await client.post(f"{url}/v2/models/generate/infer", json={"inputs": inputs})
    reply = response.json()
    if response.status_code != 200:
        return [], f"HTTP {response.status_code}: {reply.get('error', '')[:200]}"
    outputs = {o["name"]: o.get("data", []) for o in reply["outputs"]}
    return outputs.get("output_ids", []), (outputs.get("error") or [""])[0]


async def _openai(client, base: str, r: dict) -> tuple[str, str]:
    """(the completion's text, its error's message) through `/v1/completions`, streamed or not."""
    body = {"model": r["adapter"] or "", "prompt": r["input_ids"], "max_tokens": r["max_new_tokens"],
            "stream": r["stream"]}
    async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
        if response.status_code != 200:
            return "", json.loads(await response.aread())["error"]["message"]
        if not r["stream"]:
            return json.loads(await response.aread())["choices"][0]["text"], ""
        text = ""
        async for line in response.aiter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                event = json.loads(line[5:])
                if "error" in event:
                    return text, event["error"]["message"]
                text += event["choices"][0]["text"]
    return text, ""


async def _send_all(url: str, requests: list[dict], openai: str | None = None) -> list:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        async def one(r):
            try:
                if r["openai"]:
                    return await _openai(client, openai, r)
                return await (_stream if r["stream"] else _generate)(client, url, r)
            except Exception as e:  # counted as an unclear error: the assertion shows it
                return [], f"{type(e).__name__}: {e}"

        return await asyncio.gather(*(one(r) for r in requests))


def flood(url: str, count: int, expected, watch: int, adapters=("llama-a1", "llama-a2", None), seed: int = 0,
          openai: str | None = None, decode=None) -> dict:
    """Send `count` requests at once; `expected(ids, adapter, max_new_tokens)` is the same request alone.
    `watch` is the server's process group, whose RSS is sampled every 50 ms meanwhile. `openai`: the
    OpenAI API's address (its answers compared with `decode` of the tokens alone)."""
    requests = requests_for(count, list(adapters), seed, openai=openai is not None)
    peak, stop = [group_rss_kib(watch)], threading.Event()

    def sample():
        while not stop.wait(0.05):
            peak[0] = max(peak[0], group_rss_kib(watch))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.monotonic()
    try:
        answers = asyncio.run(_send_all(url, requests, openai))
    finally:
        stop.set()
        sampler.join()
    seconds = time.monotonic() - start
    report = {"requests": count, "seconds": round(seconds, 2), "correct": 0, "busy": 0, "wrong": [], "other_errors": []}
    for r, (tokens, error) in zip(requests, answers):
        if error:
            key = "busy" if error.startswith("busy: ") else None
            if key:
                report["busy"] += 1
            else:
                report["other_errors"].append(error[:300])
        elif tokens == (decode if r["openai"] else list)(expected(r["input_ids"], r["adapter"], r["max_new_tokens"])):
            report["correct"] += 1
        else:
            report["wrong"].append(r)
    report["rss_peak_kib"] = max(peak[0], group_rss_kib(watch))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", help="the folder tests/serve/prepare.py wrote")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="floods in a row (memory must not grow round to round)")
    parser.add_argument("--openai", action="store_true", help="half the requests through the OpenAI-compatible API")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ia3_export.runtime import GenerationOptions, IA3Session, generate_ids
    from ia3_export.serve.process import ServerProcess, free_ports

    folder = os.path.join(args.exports, "llama-bank")
    session = IA3Session(folder)
    session.load_shipped_adapters()
    cache = {}

    def expected(ids, adapter, n):
        key = (tuple(ids), adapter, n)
        if key not in cache:
            cache[key] = generate_ids(session, [ids], [adapter], GenerationOptions(max_new_tokens=n))[0]
        return cache[key]

    port = free_ports(1)[0]
    front = ("--openai-port", str(port)) if args.openai else ()
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(
            folder, "--max-queue", str(args.max_queue), "--max-batch", str(args.max_batch), "--drain-timeout", "10",
            *front, log_path=os.path.join(tmp, "server.log")) as server:
        pgid = server.process.pid
        time.sleep(1)
        rounds = [{"rss_before_kib": group_rss_kib(pgid)}]
        for i in range(args.rounds):
            report = flood(server.url, args.requests, expected, pgid, seed=i,
                           openai=f"http://127.0.0.1:{port}" if args.openai else None, decode=session.tokenizer().decode)
            time.sleep(2)  # let what the requests held go
            report["rss_after_kib"] = group_rss_kib(pgid)
            report["wrong"], report["other_errors"] = len(report["wrong"]), report["other_errors"][:5]
            rounds.append(report)
            print(json.dumps(report), flush=True)
    print(json.dumps({"max_queue": args.max_queue, "max_batch": args.max_batch, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
