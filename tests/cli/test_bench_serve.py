"""scripts/bench_serve.py's arithmetic: arrivals, the per-request measures and the goals' verdicts, on
hand-made records (the servers themselves are exercised by the benchmark's run, not here)."""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, SCRIPTS)  # the script imports benchlib beside it
    try:
        spec = importlib.util.spec_from_file_location("bench_serve", os.path.join(SCRIPTS, "bench_serve.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(SCRIPTS)


def test_requests_are_seeded_and_in_range(bench):
    requests = bench.sweep_requests(200, seed=3)
    assert requests == bench.sweep_requests(200, seed=3)
    assert all(4 <= len(r["input_ids"]) <= 16 and 8 <= r["max_new_tokens"] <= 128 for r in requests)
    assert {r["adapter"] for r in requests} == {*bench.ADAPTERS, None}


def test_poisson_arrivals(bench):
    assert bench.poisson_arrivals(5, math.inf, seed=0) == [0.0] * 5
    times = bench.poisson_arrivals(4000, 8.0, seed=1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and min(gaps) >= 0
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 8, rel=0.05)  # exponential gaps of mean 1/rate


def test_metrics_follow_their_definitions(bench):
    # request 0: streamed, 5 tokens in responses at 0.1, 0.2, 0.5 s, done at 0.5 s; request 1: one whole
    # answer of 3 tokens after 0.3 s; request 2 failed
    run = {"wall_s": 2.0, "records": [
        {"tokens": [1, 2, 3, 4, 5], "times": [0.1, 0.2, 0.5], "sent": 10.0, "end": 10.5},
        {"tokens": [7, 8, 9], "times": [0.3], "sent": 11.0, "end": 11.3},
        {"error": "busy", "sent": 11.0, "end": 11.1}]}
    m = bench.metrics(run)
    assert m["ttft_ms"]["p50"] == pytest.approx(200.0)  # median of 100 and 300 ms
    assert m["tpot_ms"]["p50"] == pytest.approx((500 - 100) / 4)  # streamed requests only
    assert m["itl_ms"]["p99"] == pytest.approx(100 + 0.99 * 200)  # gaps 100 and 300 ms
    assert m["e2e_ms"]["p50"] == pytest.approx(400.0)
    assert (m["completed"], m["errors"], m["new_tokens"]) == (2, 1, 8)
    assert m["new_tokens_per_s"] == pytest.approx(4.0)


SATURATION = {"continuous": {"new_tokens_per_s": 130.0}, "request": {"new_tokens_per_s": 100.0},
              "continuous_single_adapter": {"new_tokens_per_s": 140.0}}


def _row(e2e_p99, ttft_p50, tokens_per_s=100.0):
    return {"e2e_ms": {"p99": e2e_p99}, "ttft_ms": {"p50": ttft_p50}, "new_tokens_per_s": tokens_per_s}


def test_goals_judge_at_the_first_rate_where_request_batching_reaches_3x(bench):
    result = {"sweep": {
        "unloaded_request": {"e2e_ms": {"p50": 100.0}},
        "by_rate": {"1": {"request": _row(250, 100), "continuous": _row(200, 10)},
                    "2": {"request": _row(400, 300), "continuous": _row(180, 50)},  # 4x: judged here
                    "4": {"request": _row(900, 800), "continuous": _row(100, 10)}},
        "saturation": SATURATION}}
    verdicts = {g["goal"]: (g["pass"], g.get("ratio")) for g in bench.goals(result)}
    assert verdicts == {"continuous p99 e2e <= 0.5x request batching's": (True, 0.45),
                        "continuous median TTFT <= 0.2x request batching's": (True, 0.167),
                        "saturation throughput (rate inf) continuous >= 1.3x request": (True, 1.3),
                        "mixed adapters >= 0.95x single-adapter throughput at saturation (continuous)": (False, 0.929)}


def test_the_p99_goal_reports_its_floor_the_longest_request_alone(bench):
    """No load makes a request faster than alone: where the rate's longest request alone already takes more
    than half of request batching's p99, the verdict says the goal is out of reach there."""
    by_rate = {"4": {"request": _row(400, 300), "continuous": _row(240, 20)}}
    for alone, floor, over in ((150.0, 0.375, False), (220.0, 0.55, True)):
        result = {"sweep": {"unloaded_request": {"e2e_ms": {"p50": 100.0}}, "by_rate": by_rate,
                            "longest_alone_ms": {"4": alone}, "saturation": SATURATION}}
        p99 = next(g for g in bench.goals(result) if g["goal"].startswith("continuous p99"))
        assert (p99["pass"], p99["ratio"], p99["floor_ratio"]) == (False, 0.6, floor)
        assert f"alone on the continuous server {alone:.0f} ms" in p99["numbers"]
        assert ("over the goal before any load" in p99["numbers"]) is over


def test_saturation_goals_pair_the_cases_of_each_round(bench):
    """A round that ran slow for every case is one slow round: the goal takes the median of the per-round
    ratios (here 1.5, 1.5, 1.2 -> 1.5) where the medians' ratio (150 / 120 = 1.25) would fail it."""
    rounds = {"continuous": [150.0, 300.0, 120.0], "request": [100.0, 200.0, 100.0],
              "continuous_single_adapter": [150.0, 310.0, 120.0], "continuous_not_streamed": [1.0, 1.0, 1.0]}
    sends = {name: iter(values) for name, values in rounds.items()}
    send = {"continuous": "continuous", "request": "request", "continuous_generate": "continuous_not_streamed"}

    def open_loop(fn, requests, arrivals):
        single = fn == "continuous" and all(r["adapter"] == bench.ADAPTERS[0] for r in requests)
        case = "continuous_single_adapter" if single else fn
        return {"wall_s": 1.0, "records": [{"tokens": [0] * int(next(sends[case])), "times": [0.1], "sent": 0.0, "end": 1.0}]}

    original = bench.open_loop
    bench.open_loop = open_loop
    try:
        sat = bench.saturation(send, type("Args", (), {"sweep_requests": 4, "saturation_rounds": 3}))
    finally:
        bench.open_loop = original
    assert sat["continuous"]["rounds_new_tokens_per_s"] == [150.0, 300.0, 120.0]
    assert sat["paired"] == {"continuous_over_request": 1.5, "mixed_over_single_adapter": pytest.approx(1.0)}
    result = {"sweep": {"unloaded_request": {"e2e_ms": {"p50": 100.0}}, "by_rate": {}, "saturation": sat}}
    verdicts = {g["goal"]: (g["pass"], g.get("ratio")) for g in bench.goals(result)}
    assert verdicts["saturation throughput (rate inf) continuous >= 1.3x request"] == (True, 1.5)
