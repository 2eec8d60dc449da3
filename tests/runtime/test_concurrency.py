"""One IA3Session serving several threads at once, a different adapter per request: every response
equals what a single-threaded session answers for that adapter (no cross-talk through bindings),
also while another thread loads and unloads adapters (bank rebuilds) in the middle of the run."""
from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from runtime_helpers import export_once, open_session, padded, prefill_feeds

THREADS = 4
REQUESTS = 12  # per thread; a bounded soak (the long one is scripts/bench_concurrency.py)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, model_dir, adapter_dir):
    base = model_dir("llama")
    a1, a2, a3 = (adapter_dir("llama", seed=s) for s in (1, 2, 3))
    return {"a1": a1, "a2": a2, "a3": a3,
            **{mode: export_once(tmp_path_factory, base, mode, [a1, a2]) for mode in ("swappable", "bank")}}


def requests(mode: str) -> list[tuple]:
    """(kind, adapters per row or one name) requests; bank requests mix adapters within a batch."""
    names = ["adapter1", "adapter2", None]
    out = [("logits", [n, n]) for n in names] + [("generate", n) for n in names]
    if mode == "bank":
        out += [("logits", ["adapter2", "adapter1"]), ("logits", [None, "adapter2"]), ("generate", "mixed")]
    return out


def answer(s, request):
    from ia3_export.runtime.generation import GenerationOptions, generate_ids

    kind, adapters = request
    ids, mask = padded()
    if kind == "logits":
        return s.run(prefill_feeds(s, ids, mask), adapters=adapters)["logits"]
    rows = ["adapter1", "adapter2"] if adapters == "mixed" else [adapters, adapters]
    return np.array(generate_ids(s, [[5, 6, 7, 8], [9, 10, 11, 12]], rows, GenerationOptions(max_new_tokens=5)))


def serve_concurrently(s, mode, churn: str | None = None) -> list[tuple]:
    """Each thread sends random requests to the one session; returns (request, response) pairs."""
    todo = requests(mode)
    results, errors = [], []
    stop = threading.Event()

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(REQUESTS):
                request = rng.choice(todo)
                results.append((request, answer(s, request)))
        except Exception as e:  # noqa: BLE001 - reported below with its request
            errors.append(e)

    def churner():  # loads and unloads a third adapter over and over: bank rebuilds, dict changes
        while not stop.is_set():
            s.load_adapter(churn, name="adapter3")
            s.unload_adapter("adapter3")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    extra = threading.Thread(target=churner) if churn else None
    for t in threads + ([extra] if extra else []):
        t.start()
    for t in threads:
        t.join(timeout=300)
    stop.set()
    if extra:
        extra.join(timeout=60)
    assert not errors, errors[0]
    assert len(results) == THREADS * REQUESTS
    return results


@pytest.mark.parametrize("mode", ["swappable", "bank"])
def test_concurrent_requests_equal_single_threaded_answers(llama, mode):
    single = open_session(llama[mode], llama["a1"], llama["a2"])
    expected = {str(r): answer(single, r) for r in requests(mode)}
    # the adapters really differ, so any cross-talk would show
    assert np.abs(expected[str(("logits", ["adapter1"] * 2))] - expected[str(("logits", ["adapter2"] * 2))]).max() > 1e-3

    shared = open_session(llama[mode], llama["a1"], llama["a2"])
    shared.set_adapter("adapter2")  # a session default that per-request adapters must not disturb
    results = serve_concurrently(shared, mode, churn=llama["a3"])
    for request, got in results:
        np.testing.assert_allclose(got, expected[str(request)], atol=1e-5, rtol=1e-5, err_msg=str(request))
    assert shared.active == "adapter2"
    np.testing.assert_allclose(answer(shared, ("logits", None)), expected[str(("logits", ["adapter2"] * 2))], atol=1e-5)


def test_each_thread_keeps_its_own_binding(llama):
    """A switch on one thread does not move another thread's bound adapter (per-thread IOBinding)."""
    s = open_session(llama["swappable"], llama["a1"], llama["a2"])
    ids, mask = padded()
    reference = {n: s.run(prefill_feeds(s, ids, mask), adapters=[n, n])["logits"] for n in ("adapter1", "adapter2")}
    ready, switched, out = threading.Event(), threading.Event(), {}

    def other():
        s.set_adapter("adapter1")  # binds adapter1 on THIS thread
        ready.set()
        switched.wait(30)
        out["other"] = s.run(prefill_feeds(s, ids, mask), adapters=["adapter1", "adapter1"])["logits"]

    t = threading.Thread(target=other)
    t.start()
    ready.wait(30)
    out["main"] = s.run(prefill_feeds(s, ids, mask), adapters=["adapter2", "adapter2"])["logits"]
    switched.set()
    t.join(30)
    np.testing.assert_allclose(out["main"], reference["adapter2"], atol=1e-6)
    np.testing.assert_allclose(out["other"], reference["adapter1"], atol=1e-6)
