"""The continuous-batching engine (issue 23): every request's tokens are those of the same request run
alone (`generate_ids`) and PEFT's, whatever joins or leaves the batch around it, in both KV layouts
and every adapter mode; its bounds (queue, KV budget, timeout, cancel) refuse or hold requests clearly.
The tests drive `step()` themselves, submitting between steps, so every arrival is deterministic."""
from __future__ import annotations

import threading

import pytest

from ia3_export.errors import IA3Error
from runtime_helpers import export_once, llama_exports, open_session, peft_greedy, peft_model


def options(max_new_tokens=12, **kw):
    from ia3_export.runtime import GenerationOptions

    return GenerationOptions(max_new_tokens=max_new_tokens, **kw)


def request(prompt, adapter=None, **kw):
    from ia3_export.runtime import Request

    return Request(prompt, adapter, options(**kw))


def alone(s, req) -> list[int]:
    """The reference: the request run by itself through generate_ids."""
    from ia3_export.runtime import generate_ids

    prompt = s.tokenizer().encode(req.prompt) if isinstance(req.prompt, str) else req.prompt
    return generate_ids(s, [prompt], [req.adapter], req.options, s.tokenizer().decode)[0]


def drive(engine, arrivals: dict[int, list]) -> tuple[list, int]:
    """Submit arrivals[i] just before step i, step until nothing is left; (handles in order, widest batch)."""
    handles, widest, i = [], 0, 0
    while True:
        handles += [engine.submit(r) for r in arrivals.get(i, [])]
        more = engine.step()
        widest = max(widest, engine.active)
        i += 1
        if not more and i > max(arrivals):
            return handles, widest


# prompts of different lengths and lengths to generate; arrivals while others are mid-generation
MIXED = {0: [([5, 6, 7, 8, 9, 10], None, 12), ([11, 12, 13], "adapter1", 6)],
         2: [([40, 41], "adapter2", 14)],
         3: [([20, 21, 22, 23, 24, 25, 26, 27, 28], "adapter1", 9), ([30, 31, 32, 33], None, 3)],
         7: [([50, 51, 52, 53, 54], "adapter2", 10), ([60], "adapter1", 12)]}


def mixed_requests(adapters=True):
    return {step: [request(p, a if adapters else None, max_new_tokens=n) for p, a, n in reqs]
            for step, reqs in MIXED.items()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory, model_dir, adapter_dir):
    return llama_exports(tmp_path_factory, model_dir, adapter_dir)


@pytest.mark.parametrize("mode", ["bank", "swappable", "foldswap"])
def test_mixed_adapters_arriving_mid_generation_get_their_tokens_alone_and_peft(llama, mode):
    """Bank rows mix adapters in one batch; swappable and foldswap run one batch per adapter group.
    Requests join at steps 0, 2, 3 and 7 and leave at their own lengths: each gets what it gets alone,
    and the adapter1 requests what PEFT generates."""
    from ia3_export.runtime import Engine

    s = open_session(llama[mode], llama["a1"], llama["a2"])
    arrivals = mixed_requests()
    handles, widest = drive(Engine(s, max_batch=4), arrivals)
    requests = [r for step in sorted(arrivals) for r in arrivals[step]]
    results = [h.result(0) for h in handles]
    assert [r.tokens for r in results] == [alone(s, r) for r in requests]
    for r, res in zip(requests, results):
        if r.adapter == "adapter1":
            assert res.tokens == peft_greedy(llama["base"], llama["a1"], [r.prompt], len(res.tokens))[0]
    assert [r.finish_reason for r in results] == ["length"] * len(requests)
    assert widest == 4  # max_batch held: the last arrivals waited for rows to leave


def test_the_shared_buffer_layout_batches_rows_at_their_own_lengths(fused_exports, fused_llama):
    """`--graph fused` (GroupQueryAttention over one buffer, each row's length from the mask): a bank export
    mixes the base and its adapter per row, rows joining and leaving; PEFT's tokens for the adapter."""
    from ia3_export.runtime import Engine, IA3Session

    base, adapter, _ = fused_llama
    s = IA3Session(fused_exports("bank"))
    (name,) = s.load_shipped_adapters()
    arrivals = {step: [request(r.prompt, r.adapter and name, max_new_tokens=r.options.max_new_tokens) for r in reqs]
                for step, reqs in mixed_requests().items()}
    handles, widest = drive(Engine(s, max_batch=4), arrivals)
    requests = [r for step in sorted(arrivals) for r in arrivals[step]]
    tokens = [h.result(0).tokens for h in handles]
    assert tokens == [alone(s, r) for r in requests] and widest == 4
    for r, got in zip(requests, tokens):
        if r.adapter:
            assert got == peft_greedy(base, adapter, [r.prompt], len(got))[0]


@pytest.mark.parametrize("layout, seed", [("concat", 0), ("concat", 1), ("shared", 2)])
def test_random_arrival_schedules_never_change_a_requests_tokens(llama, fused_exports, layout, seed):
    """14 requests (random prompts, adapters, lengths, EOS for some) arrive at random steps into at most 3
    rows: whatever joins or leaves around it, each request gets the tokens it gets alone."""
    import numpy as np

    from ia3_export.runtime import Engine, IA3Session

    if layout == "concat":
        s = open_session(llama["bank"], llama["a1"], llama["a2"])
        names = [None, "adapter1", "adapter2"]
    else:
        s = IA3Session(fused_exports("bank"))
        names = [None, *s.load_shipped_adapters()]
    rng = np.random.default_rng(seed)
    arrivals: dict[int, list] = {}
    for _ in range(14):
        prompt = rng.integers(3, 250, int(rng.integers(1, 12))).tolist()
        eos = [int(rng.integers(3, 250))] if rng.random() < 0.3 else None
        req = request(prompt, names[int(rng.integers(0, len(names)))], max_new_tokens=int(rng.integers(1, 16)), eos_token_ids=eos)
        arrivals.setdefault(int(rng.integers(0, 25)), []).append(req)
    handles, widest = drive(Engine(s, max_batch=3), arrivals)
    assert [h.result(0).tokens for h in handles] == [alone(s, r) for step in sorted(arrivals) for r in arrivals[step]]
    assert widest == 3


def test_rows_leave_at_eos_stop_strings_and_length_while_others_go_on(llama):
    """An EOS, a stop string (text prompt) and max_new_tokens end rows early at the token where they end
    alone; the rows around them keep their tokens."""
    from ia3_export.runtime import Engine

    s = open_session(llama["bank"], llama["a1"], llama["a2"])
    long = request([5, 6, 7, 8, 9, 10], "adapter1", max_new_tokens=20)
    full = alone(s, request([11, 12, 13], "adapter2", max_new_tokens=20))
    eos = request([11, 12, 13], "adapter2", max_new_tokens=20, eos_token_ids=[full[4]])
    text = s.tokenizer().decode(alone(s, request("The cat", max_new_tokens=20)))
    stop = request("The cat", max_new_tokens=20, stop_strings=[next(c for c in text[3:] if c.isalpha())])
    short = request([40, 41], "adapter1", max_new_tokens=2)
    handles, _ = drive(Engine(s), {0: [long, eos], 1: [stop, short]})
    results = [h.result(0) for h in handles]
    assert results[1].tokens == full[:full.index(full[4]) + 1]
    assert [r.tokens for r in results] == [alone(s, r) for r in (long, eos, stop, short)]
    assert [r.finish_reason for r in results] == ["length", "stop", "stop", "length"]
    assert [r.prompt_tokens for r in results] == [6, 3, len(s.tokenizer().encode("The cat")), 2]
    assert results[2].text == s.tokenizer().decode(results[2].tokens) and results[2].text.endswith(stop.options.stop_strings[0])
    assert len(results[2].tokens) < 20


def test_sampled_rows_with_seeds_get_the_tokens_they_get_alone(llama):
    """Each request samples with its own seeded RNG, so batch neighbours never shift its draws."""
    from ia3_export.runtime import Engine

    s = open_session(llama["bank"], llama["a1"], llama["a2"])
    sampled = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    arrivals = {0: [request([5, 6, 7], "adapter1", seed=1, **sampled), request([8, 9], None, seed=2, **sampled)],
                2: [request([5, 6, 7], "adapter1", seed=3, **sampled), request([5, 6, 7], "adapter2")]}
    handles, _ = drive(Engine(s), arrivals)
    tokens = [h.result(0).tokens for h in handles]
    assert tokens == [alone(s, r) for step in sorted(arrivals) for r in arrivals[step]]
    assert tokens[0] != tokens[2]  # the seed matters


def test_logprobs_are_the_models_own_whatever_shares_the_batch(llama):
    """Request.logprobs: each new token's log-probability and its k most likely alternatives', equal to PEFT's
    model in float64 (log_softmax of its logits over prompt + chosen tokens) to float32's error, for a greedy
    and a sampled row (the model's own distribution, before temperature) sharing the batch with a row that
    asks for none and one that arrives later; the greedy row's token is its own most likely."""
    import numpy as np
    import torch

    from ia3_export.runtime import Engine, Request

    s = open_session(llama["bank"], llama["a1"], llama["a2"])
    requests = [Request([5, 6, 7, 8], "adapter1", options(10), logprobs=3),
                Request([11, 12, 13], None, options(8, do_sample=True, temperature=1.5, seed=4), logprobs=0),
                Request([40, 41], "adapter2", options(9)), Request([20, 21, 22], "adapter2", options(6), logprobs=5)]
    handles, widest = drive(Engine(s, max_batch=4), {0: requests[:3], 3: requests[3:]})
    assert widest == 4 and handles[2].logprobs == []
    for request, handle, adapter in zip(requests, handles, (llama["a1"], None, None, llama["a2"])):
        tokens = handle.result(0).tokens
        assert tokens == alone(s, request)
        if request.logprobs is None:
            continue
        model = peft_model(llama["base"], adapter).double()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([request.prompt + tokens])).logits
        want = torch.log_softmax(logits[0], -1).numpy()[len(request.prompt) - 1:-1]  # position t predicts token t+1
        assert len(handle.logprobs) == len(tokens)
        for step, (token, (logprob, top)) in enumerate(zip(tokens, handle.logprobs)):
            best = np.argsort(-want[step], kind="stable")[:request.logprobs]
            assert abs(logprob - want[step, token]) < 1e-4 and [i for i, _ in top] == best.tolist()
            assert np.allclose([lp for _, lp in top], want[step, best], atol=1e-4)
            assert request.options.do_sample or top[0][0] == token
    with pytest.raises(IA3Error, match="logprobs must be an integer from 0 to 20"):
        Engine(s).submit(Request([5], None, options(2), logprobs=21))


@pytest.mark.parametrize("layout", ["concat", "shared"])
def test_prompt_logprobs_score_the_prompt_as_the_model_does(llama, fused_llama, fused_exports, layout):
    """Request.prompt_logprobs (what lm-eval's loglikelihood asks of a server through `echo`): each prompt
    token after the first gets its log-probability given the tokens before it, and its k most likely
    alternatives, equal to PEFT's model in float64; on the traced graph and on the fused one (whose LM head
    keeps only the last position unless asked), prefilled with other rows arriving at the same step
    (a scoring row runs its prefill alone); the new tokens stay those of the request alone."""
    import numpy as np
    import torch

    from ia3_export.runtime import Engine, IA3Session, Request

    if layout == "concat":
        s, name = open_session(llama["bank"], llama["a1"], llama["a2"]), "adapter1"
        base, adapter = llama["base"], llama["a1"]
    else:
        s = IA3Session(fused_exports("bank"))
        (name,) = s.load_shipped_adapters()
        base, adapter, _ = fused_llama
    prompt = [5, 6, 7, 8, 9, 30, 31]
    requests = [Request(prompt, name, options(4), prompt_logprobs=3), Request([11, 12], None, options(5)),
                Request(prompt[:3], name, options(3), prompt_logprobs=0, logprobs=1)]
    handles, _ = drive(Engine(s, max_batch=4), {0: requests})
    assert handles[1].prompt_logprobs is None
    model = peft_model(base, adapter).double()
    for request, handle in zip(requests[::2], handles[::2]):
        assert handle.result(0).tokens == alone(s, request)
        with torch.no_grad():
            want = torch.log_softmax(model(input_ids=torch.tensor([request.prompt])).logits[0], -1).numpy()
        got = handle.prompt_logprobs
        assert len(got) == len(request.prompt) and got[0] is None
        for p, (logprob, top) in enumerate(got[1:], 1):  # position p - 1 predicts token p
            best = np.argsort(-want[p - 1], kind="stable")[:request.prompt_logprobs]
            assert abs(logprob - want[p - 1, request.prompt[p]]) < 1e-4 and [i for i, _ in top] == best.tolist()
            assert np.allclose([lp for _, lp in top], want[p - 1, best], atol=1e-4)
    with pytest.raises(IA3Error, match="prompt_logprobs must be an integer from 0 to 20"):
        Engine(s).submit(Request([5], None, options(2), prompt_logprobs=-1))


def test_a_full_queue_says_busy_and_a_request_that_never_fits_the_kv_budget_is_refused(llama):
    from ia3_export.runtime import Engine

    s = open_session(llama["bank"], llama["a1"])
    engine = Engine(s, max_queue=2, kv_token_budget=20)
    engine.submit(request([5, 6, 7]))
    engine.submit(request([5, 6, 7]))
    with pytest.raises(IA3Error, match=r"^busy: 2 requests queued, the limit is 2; retry later$"):
        engine.submit(request([5, 6, 7]))
    with pytest.raises(IA3Error, match="needs 25 KV tokens .prompt 5 . max_new_tokens 20., more than the engine's "
                                       "kv_token_budget of 20; shorten it or raise the budget"):
        engine.submit(request([5, 6, 7, 8, 9], max_new_tokens=20))


def test_a_request_over_the_kv_budget_waits_in_the_queue_then_runs(llama):
    """Budget 30 holds one request of 5 + 12 tokens at a time: the second waits, then gets its tokens."""
    from ia3_export.runtime import Engine

    s = open_session(llama["bank"], llama["a1"])
    engine = Engine(s, kv_token_budget=30)
    first, second = request([5, 6, 7, 8, 9], "adapter1"), request([9, 8, 7, 6, 5])
    handles = [engine.submit(first), engine.submit(second)]
    engine.step()
    assert (engine.active, engine.queued, engine.kv_tokens) == (1, 1, 17)
    while engine.step():
        assert engine.kv_tokens <= 30
    assert [h.result(0).tokens for h in handles] == [alone(s, first), alone(s, second)]
    assert engine.kv_tokens == 0


def test_a_timeout_ends_a_running_and_a_queued_request_with_deadline(llama):
    """The engine's clock is injectable: past its timeout a row is retired at the next step (its tokens so
    far kept), a queued request never starts, and the row beside it goes on untouched."""
    from ia3_export.runtime import Engine, Request

    now = [0.0]
    s = open_session(llama["bank"], llama["a1"])
    engine = Engine(s, max_batch=2, clock=lambda: now[0])
    timed, other = Request([5, 6, 7], None, options(20), timeout=5), request([8, 9, 10], "adapter1", max_new_tokens=20)
    queued = Request([5, 6], None, options(5), timeout=5)
    handles = [engine.submit(timed), engine.submit(other), engine.submit(queued)]
    engine.step()
    engine.step()
    now[0] = 5.0
    engine.step()
    assert [h.result(0).finish_reason for h in (handles[0], handles[2])] == ["deadline", "deadline"]
    assert handles[0].result().tokens == alone(s, timed)[:3] and handles[2].result().tokens == []
    assert (engine.active, engine.queued, engine.kv_tokens) == (1, 0, 23)
    while engine.step():
        pass
    assert handles[1].result(0).tokens == alone(s, other)


def test_cancel_frees_the_row_at_the_next_step(llama):
    from ia3_export.runtime import Engine

    s = open_session(llama["swappable"], llama["a1"], llama["a2"])
    engine = Engine(s)
    stays = request([8, 9, 10], "adapter2", max_new_tokens=15)
    handles = [engine.submit(request([5, 6, 7], "adapter1", max_new_tokens=15)), engine.submit(stays)]
    engine.step()
    handles[0].cancel()
    engine.step()
    assert handles[0].result(0).finish_reason == "cancelled" and len(handles[0].result().tokens) == 2
    assert engine.active == 1
    while engine.step():
        pass
    assert handles[1].result(0).tokens == alone(s, stays)


def test_an_adapter_unloaded_while_its_request_runs_ends_it_with_error(llama):
    """Unloading an adapter under a running bank row ends that request (next time the batch is gathered)
    with a clear error; the rows beside it keep their tokens."""
    from ia3_export.runtime import Engine

    s = open_session(llama["bank"], llama["a1"], llama["a2"])
    engine = Engine(s)
    stays, late = request([8, 9, 10], "adapter2", max_new_tokens=15), request([20, 21], max_new_tokens=5)
    handles = [engine.submit(request([5, 6, 7], "adapter1", max_new_tokens=15)), engine.submit(stays)]
    engine.step()
    s.unload_adapter("adapter1")
    handles.append(engine.submit(late))
    while engine.step():
        pass
    gone = handles[0].result(0)
    assert gone.finish_reason == "error" and gone.error == "adapter 'adapter1' was unloaded while the request ran; submit it again"
    assert [h.result(0).tokens for h in handles[1:]] == [alone(s, stays), alone(s, late)]


def test_a_failing_request_ends_with_error_and_its_neighbours_go_on(llama):
    """A token id past the vocabulary fails in ONNX Runtime: that request ends with reason "error" and the
    message, the loop and the other rows go on."""
    from ia3_export.runtime import Engine

    s = open_session(llama["bank"], llama["a1"])
    ok = request([5, 6, 7], "adapter1")
    handles, _ = drive(Engine(s), {0: [ok], 1: [request([5, 10 ** 6])]})
    assert handles[0].result(0).tokens == alone(s, ok)
    bad = handles[1].result(0)
    assert bad.finish_reason == "error" and bad.tokens == [] and "ONNX Runtime failed to run the model" in bad.error


def test_the_thread_streams_each_token_before_the_end_to_iterators_and_callbacks(llama):
    """start(): submissions from several threads; each handle yields its tokens as they are chosen and the
    callback sees every token and then the Result; the tokens are those alone."""
    from ia3_export.runtime import Engine, Result

    s = open_session(llama["bank"], llama["a1"], llama["a2"])
    requests = [request([5, 6, 7, 8], "adapter1", max_new_tokens=16), request([11, 12], "adapter2", max_new_tokens=4),
                request([20, 21, 22], None, max_new_tokens=9)]
    events = [[] for _ in requests]
    streamed = [None] * len(requests)
    with Engine(s) as engine:
        def client(i):
            handle = engine.submit(requests[i], on_event=events[i].append)
            streamed[i] = list(handle)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    want = [alone(s, r) for r in requests]
    assert streamed == want
    assert [e[:-1] for e in events] == want and all(isinstance(e[-1], Result) and e[-1].tokens == w
                                                     for e, w in zip(events, want))


def test_bad_requests_are_refused_at_submit(llama, tmp_path_factory, model_dir, adapter_dir):
    from ia3_export.runtime import Engine, IA3Session, Request

    s = open_session(llama["bank"], llama["a1"])
    engine = Engine(s)
    with pytest.raises(IA3Error, match=r"adapter 'adapter2' is not loaded \(loaded: adapter1\)"):
        engine.submit(request([5, 6], "adapter2"))
    with pytest.raises(IA3Error, match="every prompt needs at least one token"):
        engine.submit(request([]))
    with pytest.raises(IA3Error, match=r"a prompt is text or a list of integer token ids, got \[5, 'a'\]"):
        engine.submit(request([5, "a"]))
    with pytest.raises(IA3Error, match="timeout must be a number of seconds >= 0"):
        engine.submit(Request([5], None, options(), timeout=-1))
    with pytest.raises(IA3Error, match="the prompt has 128 tokens; the model takes at most 128 positions"):
        engine.submit(request([5] * 128))
    with pytest.raises(IA3Error, match="max_batch must be an integer of at least 1, got 0"):
        Engine(s, max_batch=0)
    merged = IA3Session(export_once(tmp_path_factory, model_dir("llama"), "merged", [llama["a1"]]))
    with pytest.raises(IA3Error, match="is a merged export .* send requests without an adapter, or export with "
                                       "--mode bank to serve 'adapter1'"):
        Engine(merged).submit(request([5, 6], "adapter1"))
    engine.close()
    with pytest.raises(IA3Error, match="the engine is closed"):
        engine.submit(request([5, 6]))


def test_an_export_without_a_decoder_cache_is_refused(tmp_path_factory, model_dir):
    from ia3_export.runtime import Engine, IA3Session

    s = IA3Session(export_once(tmp_path_factory, model_dir("bert", "seq-cls"), "merged", []))
    with pytest.raises(IA3Error, match="is a text-classification export without a decoder KV cache; the engine runs causal-lm exports"):
        Engine(s)


def session_for(llama, fused_exports, export):
    """(session, adapter names) for "concat-bank", "concat-swappable" or "shared-bank" (`--graph fused`)."""
    from ia3_export.runtime import IA3Session

    layout, mode = export.split("-")
    if layout == "concat":
        return open_session(llama[mode], llama["a1"], llama["a2"]), ["adapter1", "adapter2"]
    s = IA3Session(fused_exports(mode))
    return s, s.load_shipped_adapters()


@pytest.mark.parametrize("export", ["concat-bank", "concat-swappable", "shared-bank", "shared-swappable"])
def test_arrivals_at_one_step_prefill_in_one_run_per_group_with_their_tokens_alone(llama, fused_llama, fused_exports, export):
    """Five prompts of different lengths (1-9 tokens), base and adapters mixed, arrive together: a bank
    export prefills them in ONE run (left-padded with positions, or right-padded for GroupQueryAttention),
    a swappable one in one run per adapter group; each request's tokens are those it gets alone, and PEFT's."""
    from ia3_export.runtime import Engine

    s, names = session_for(llama, fused_exports, export)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40], [20, 21, 22], [30, 31, 32, 33, 34], [60, 61]]
    adapters = [names[0], None, names[-1], names[0], None]
    requests = [request(p, a, max_new_tokens=8) for p, a in zip(prompts, adapters)]
    engine = Engine(s, max_batch=8)
    handles = [engine.submit(r) for r in requests]
    engine.step()
    assert engine.stats["prefill_runs"] == len(set(adapters)) if "swappable" in export else 1
    assert engine.stats["decode_runs"] == engine.stats["prefill_runs"]  # then one decode step per group
    while engine.step():
        pass
    tokens = [h.result(0).tokens for h in handles]
    assert tokens == [alone(s, r) for r in requests]
    base, adapter = (llama["base"], llama["a1"]) if export.startswith("concat") else fused_llama[:2]
    for r, got in zip(requests, tokens):
        if r.adapter == names[0]:
            assert got == peft_greedy(base, adapter, [r.prompt], len(got))[0]


@pytest.mark.parametrize("layout", ["concat", "shared"])
def test_rows_leave_and_join_in_place_and_the_batch_compacts(llama, fused_exports, layout):
    """Rows that end free their slot; a row joining at the next step boundary takes the free slot without
    copying the batch cache, the free slots no row takes are filled by moving the last rows down, and
    new arrays come only when a row needs more room. Tokens stay those alone throughout."""
    from ia3_export.runtime import Engine

    s, names = session_for(llama, fused_exports, f"{layout}-bank")
    engine = Engine(s, max_batch=4)
    # step 1 gives two tokens (prefill, decode), each later step one: max_new_tokens n ends in step n - 1
    first = [request([5, 6, 7, 8, 9, 10, 11, 12], names[0], max_new_tokens=14),
             request([20, 21, 22], None, max_new_tokens=4),  # ends in step 3: slot 1 frees
             request([30, 31, 32, 33], names[-1], max_new_tokens=16),
             request([40, 41], names[0], max_new_tokens=7)]  # ends in step 6: slot 3 frees
    joins = request([50, 51], names[-1], max_new_tokens=6)  # a short prompt: fits the free slot
    late = request([60] * 30, None, max_new_tokens=6)  # longer than any row's cache: new arrays
    handles = [engine.submit(r) for r in first]
    engine.step()
    group = engine.groups[None]
    assert group.slots == group.rows and len(group.slots) == 4 and engine.stats["cache_copies"] == 1
    engine.step()
    engine.step()
    assert group.slots[1] is None and engine.active == 3  # the row ended: its slot is free, nothing copied
    handles.append(engine.submit(joins))
    engine.step()
    assert group.slots[1].handle is handles[4] and engine.stats["cache_copies"] == 1  # joined in place
    engine.step()
    engine.step()
    assert group.slots[3] is None
    engine.step()  # slot 3 was the last: dropped
    assert [r.handle for r in group.slots] == [handles[0], handles[4], handles[2]] and engine.stats["cache_copies"] == 1
    handles.append(engine.submit(late))
    engine.step()  # `joins` ends in this step (step 8)
    assert engine.stats["cache_copies"] == 2 and len(group.slots) == 4 and group.slots[1] is None
    engine.step()  # the last row moves down into the free slot: one row copied, not the batch
    assert [r.handle for r in group.slots] == [handles[0], handles[5], handles[2]] and engine.stats["cache_copies"] == 2
    while engine.step():
        pass
    assert [h.result(0).tokens for h in handles] == [alone(s, r) for r in first + [joins, late]]
    assert group.slots == [] and group.kv is None  # an empty group lets its arrays go


def test_the_concat_cache_is_trimmed_once_its_left_padding_passes_a_quarter_of_its_width(llama):
    """When the oldest row leaves, the columns only it used stay as left padding every later concat step
    reads and copies: once that padding passes a quarter of the width (engine.TRIM_FRACTION), the
    next step boundary copies the rows into arrays as wide as the longest row left. Tokens stay those
    alone."""
    from ia3_export.runtime import Engine

    s = open_session(llama["bank"], llama["a1"])
    old = request(list(range(5, 17)), "adapter1", max_new_tokens=8)  # 12 + 8 columns, ends first
    young = request([40, 41, 42, 43, 44, 45], None, max_new_tokens=24)
    engine = Engine(s, max_batch=2)
    handles = [engine.submit(old)]
    engine.step()
    handles.append(engine.submit(young))
    while not handles[0].done:
        engine.step()
    group = engine.groups[None]
    padding = group.width - group.slots[1].seen  # the young row's columns are the rightmost ones
    assert group.width / 4 < padding <= group.width / 2  # trimmed at 1/4 of the width, not yet at 1/2
    copies = engine.stats["cache_copies"]
    engine.step()  # the step boundary compacts: the young row moves down into new, narrower arrays
    assert engine.stats["cache_copies"] == copies + 1 and group.width == group.slots[0].seen
    while engine.step():
        pass
    assert [h.result(0).tokens for h in handles] == [alone(s, r) for r in (old, young)]


def test_a_bad_prompt_in_a_batched_prefill_fails_alone(llama):
    """A token id past the vocabulary makes the batched prefill fail: each row is then prefilled alone, so
    only that request ends with the error and the one that arrived with it gets its tokens."""
    from ia3_export.runtime import Engine

    s = open_session(llama["bank"], llama["a1"])
    ok = request([5, 6, 7], "adapter1")
    handles, _ = drive(Engine(s), {0: [ok, request([5, 10 ** 6])]})
    assert handles[0].result(0).tokens == alone(s, ok)
    bad = handles[1].result(0)
    assert bad.finish_reason == "error" and bad.tokens == [] and "ONNX Runtime failed to run the model" in bad.error


def test_a_streams_inbox_wakes_its_loop_only_when_it_waits_or_ends_and_keeps_its_tokens_in_order(llama):
    """serve/streaming.py's Inbox and Relay between the engine's thread and an event loop: every request's
    tokens come out of its inbox in order (those alone), then its Result; a stream that waits is woken by
    its next token, one that paces (does not wait) only by its end, and the loop at most once per engine
    step and once more on a step that prefills (Engine.after_step), not once per token."""
    import asyncio

    from ia3_export.runtime import Engine, Result
    from ia3_export.serve.streaming import Inbox, Relay

    s = open_session(llama["bank"], llama["a1"], llama["a2"])
    requests = [request([5, 6, 7, 8], "adapter1", max_new_tokens=12), request([11, 12], "adapter2", max_new_tokens=5),
                request([20, 21, 22], None, max_new_tokens=9)]

    async def main():
        loop, engine = asyncio.get_running_loop(), Engine(s)
        relay, wakes, calls = Relay(loop, engine), [], [[] for _ in requests]
        deliver = relay._deliver
        relay._deliver = lambda pending: (wakes.append(len(pending)), deliver(pending))
        inboxes = [Inbox(relay) for _ in requests]
        for i, (inbox, r) in enumerate(zip(inboxes, requests)):
            put = relay.put
            inbox.relay = type("Counting", (), {"put": lambda self, c, i=i: (calls[i].append(c), put(c))})()
            engine.submit(r, on_event=inbox.put)
        got, steps, waiter = [[] for _ in requests], 0, None
        while True:  # the engine steps on this thread; request 0 waits for every token, the others never wait
            if waiter is None:
                waiter = asyncio.ensure_future(inboxes[0].take())
                await asyncio.sleep(0)  # it checks its inbox, finds nothing and waits
            more = engine.step()
            steps += 1
            await asyncio.sleep(0.01)  # the relay's wake runs
            if waiter.done():
                tokens, result = waiter.result()
                got[0] += tokens + ([result] if result else [])
                waiter = None if result is None else False
            if not more:
                break
        for i in (1, 2):
            tokens, result = await asyncio.wait_for(inboxes[i].take(), 10)
            got[i] += tokens + [result]
        return got, wakes, steps, calls

    got, wakes, steps, calls = asyncio.run(main())
    want = [alone(s, r) for r in requests]
    assert [g[:-1] for g in got] == want and all(isinstance(g[-1], Result) and g[-1].tokens == w for g, w in zip(got, want))
    assert len(calls[1]) == len(calls[2]) == 1  # 5 and 9 tokens: woken once, by the end
    # request 0 waited at every step (its first step chose two tokens: prefill, then decode): a wake a step, then the end
    assert len(calls[0]) == steps + 1 == 12 and len(wakes) <= steps + 1  # one more on the step that prefilled


def test_a_joining_requests_first_token_reaches_the_after_step_hooks_before_the_batch_decodes(llama):
    """A request that joins a running batch gets its first token from its prefill; the hooks (where a
    server's relay wakes the stream) run before the step's decode run of every row, so the first
    response does not wait for that run. Every answer still equals the request alone."""
    from ia3_export.runtime import Engine, Result

    s = open_session(llama["bank"], llama["a1"], llama["a2"])
    engine, log = Engine(s), []
    engine.after_step.append(lambda: log.append(("hook", engine.stats["decode_runs"])))
    running = [request([5, 6, 7, 8], "adapter1", max_new_tokens=20), request([9, 10], None, max_new_tokens=16)]
    late = request([11, 12, 13], "adapter2", max_new_tokens=6)
    handles = [engine.submit(r) for r in running]
    for _ in range(3):
        engine.step()

    def on_event(event):
        if not isinstance(event, Result) and not any(kind == "late" for kind, _ in log):
            log.append(("late", engine.stats["decode_runs"]))
    handles.append(engine.submit(late, on_event=on_event))
    while engine.step():
        pass
    assert [h.result().tokens for h in handles] == [alone(s, r) for r in running + [late]]
    at = log.index(next(e for e in log if e[0] == "late"))
    next_hook = next(e for e in log[at + 1:] if e[0] == "hook")
    assert next_hook[1] == log[at][1], log[at - 2:at + 4]  # no decode run between the first token and the hook


def test_a_text_stream_fed_several_tokens_at_once_decodes_once_per_push_and_joins_to_the_text(llama):
    """The server pushes each response's tokens together (serve/streaming.py): one decode per push, pieces
    that join to the whole text, and no piece ending in half a character, whatever the chunking."""
    from ia3_export.runtime.generation import TextStream
    from ia3_export.runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(llama["base"])
    text = "héllo wörld, ça va? 日本語"
    ids = tok.encode(text)
    for size in (1, 2, 3, 7, len(ids)):
        calls = []
        stream = TextStream(lambda t: calls.append(len(t)) or tok.decode(t))
        chunks = [ids[i:i + size] for i in range(0, len(ids), size)]
        pieces = [stream.push(*c) for c in chunks[:-1]] + [stream.finish(*chunks[-1])]
        assert "".join(pieces) == tok.decode(ids) == text and len(calls) == len(chunks)
        assert not any(p.endswith("\ufffd") for p in pieces)


def test_a_results_text_is_decoded_when_read_not_on_the_engines_loop(llama):
    """A decode is a round trip to the tokenizer's child process: the engine's step never waits for one;
    the Result decodes its text on the thread that reads it, once."""
    import types

    from ia3_export.runtime import Engine

    s = open_session(llama["bank"], llama["a1"])
    engine, calls = Engine(s), []
    decode = engine._tokenizer.decode
    engine._tokenizer = types.SimpleNamespace(decode=lambda t: calls.append(threading.current_thread()) or decode(t))
    handle = engine.submit(request([5, 6, 7], "adapter1", max_new_tokens=4))
    engine.step()
    thread = threading.Thread(target=lambda: [None for _ in iter(engine.step, False)])
    thread.start()
    thread.join()
    assert calls == []
    result = handle.result(0)
    assert result.text == decode(result.tokens) == result.text and calls == [threading.current_thread()]
