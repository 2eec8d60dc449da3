"""`generate` behind Triton: every answer equals the same request run alone through IA3Session, and
requests that arrive together share ONNX Runtime batches the IA3 way (bank: one batch, each row its
own adapter; swappable: one batch per adapter), whatever their prompt lengths."""
from __future__ import annotations

import random

import pytest
from conftest import concurrently, folder

from ia3_export.serve import ServeClient, ServeError

A1, A2 = "llama-a1", "llama-a2"


def ask(url: str, **request):
    with ServeClient(url) as client:
        return client.generate(**request)


def triton_counts(server, model="generate") -> tuple[float, float]:
    """(batches Triton executed, requests it answered) so far."""
    return server.metric("nv_inference_exec_count", model), server.metric("nv_inference_request_success", model)


def check_wave(server, ref, requests: list[dict]) -> list:
    """Send `requests` together; assert they formed ONE Triton batch and each answer equals the request alone."""
    before = triton_counts(server)
    answers = concurrently([lambda r=r: ask(server.url, **r) for r in requests])
    after = triton_counts(server)
    assert (after[0] - before[0], after[1] - before[1]) == (1, len(requests)), "not one Triton batch"
    for request, answer in zip(requests, answers):
        assert not isinstance(answer, Exception), answer
        ids = request.get("input_ids") or ref.encode(request["text"])
        expected = ref.generate(ids, request["adapter"], request["max_new_tokens"])
        assert answer.outputs["output_ids"] == expected, request
        assert answer.outputs["text"] == ref.decode(expected)
    return answers


def test_mixed_adapters_and_lengths_run_as_one_bank_batch(llama_bank, reference):
    adapters = [A1, A2, None, A1, A2, None, A2, A1]
    requests = [{"input_ids": list(range(5, 6 + i)), "adapter": a, "max_new_tokens": 3 + i % 4}
                for i, a in enumerate(adapters)]  # 1..8 tokens: one bucket, left-padded in the batch
    answers = check_wave(llama_bank, reference("llama-bank"), requests)
    assert [a.batch_size for a in answers] == [8] * 8  # one ONNX Runtime batch, an adapter per row


def test_text_prompts_of_different_lengths_batch(llama_bank, reference):
    texts = ["a", "the cat", "hello there, world", "x" * 30]
    requests = [{"text": t, "adapter": a, "max_new_tokens": 5} for t in texts for a in (A1, A2)]
    answers = check_wave(llama_bank, reference("llama-bank"), requests)
    assert [a.batch_size for a in answers] == [8] * 8


def test_rows_that_fit_alone_but_not_together_still_equal_alone(llama_bank, reference):
    """A long prompt with few new tokens and a shorter one with many (one token bucket, so one Triton
    batch): each fits the model's 128 positions, together (60 + 90) they do not, so they run as two
    ONNX Runtime batches, neither cut short."""
    requests = [{"input_ids": [5 + i for i in range(60)], "adapter": A1, "max_new_tokens": 4},
                {"input_ids": [9 + i for i in range(34)], "adapter": A2, "max_new_tokens": 90}]
    answers = concurrently([lambda r=r: ask(llama_bank.url, **r) for r in requests])
    ref = reference("llama-bank")
    for request, answer in zip(requests, answers):
        assert not isinstance(answer, Exception), answer
        assert answer.outputs["output_ids"] == ref.generate(request["input_ids"], request["adapter"], request["max_new_tokens"])
    assert [a.batch_size for a in answers] == [1, 1]


def test_swappable_export_groups_by_adapter(start_server, reference):
    server = start_server(folder("llama-swappable"), "--batching", "request", "--max-batch", "8", "--max-queue-delay-us", "300000",
                          "--instances", "2", "--drain-timeout", "10")
    requests = [{"input_ids": [5, 6, 7][: 1 + i % 3], "adapter": (A1, A2)[i % 2], "max_new_tokens": 4} for i in range(8)]
    answers = check_wave(server, reference("llama-swappable"), requests)
    assert [a.batch_size for a in answers] == [4] * 8  # one Triton batch, one ONNX Runtime batch per adapter
    stats = ServeClient(server.url).adapters("stats")["generate"]
    assert stats["runtime_batches"] == {"4": 2} and stats["mixed_adapter_batches"] == 0


def test_load_random_adapters_every_answer_equals_alone(llama_bank, reference):
    """A bounded load: 8 clients x 6 requests, random adapters, lengths, sizes, text or ids, some sampled."""
    ref, rng = reference("llama-bank"), random.Random(0)
    requests = []
    for _ in range(48):
        request = {"adapter": rng.choice([A1, A2, None]), "max_new_tokens": rng.randint(1, 10)}
        if rng.random() < 0.25:
            request["text"] = "".join(rng.choice("abcdef ") for _ in range(rng.randint(1, 20)))
        else:
            request["input_ids"] = [rng.randrange(4, 300) for _ in range(rng.randint(1, 20))]
        if rng.random() < 0.1:
            request.update(do_sample=True, temperature=0.8, top_p=0.9, seed=rng.randrange(1000))
        requests.append(request)
    stats_before = ServeClient(llama_bank.url).adapters("stats")["generate"]

    def client(chunk):
        with ServeClient(llama_bank.url) as c:
            return [c.generate(**r) for r in chunk]

    chunks = [requests[i::8] for i in range(8)]
    answers = {}
    for chunk, got in zip(chunks, concurrently([lambda c=c: client(c) for c in chunks])):
        assert not isinstance(got, Exception), got
        answers.update({id(r): a for r, a in zip(chunk, got)})
    for request in requests:
        ids = request.get("input_ids") or ref.encode(request["text"])
        sampling = {k: request[k] for k in ("do_sample", "temperature", "top_p", "seed") if k in request}
        assert answers[id(request)].outputs["output_ids"] == ref.generate(ids, request["adapter"],
                                                                          request["max_new_tokens"], **sampling), request
    stats = ServeClient(llama_bank.url).adapters("stats")["generate"]
    assert stats["requests"] - stats_before["requests"] == 48
    assert stats["mixed_adapter_batches"] > stats_before["mixed_adapter_batches"]  # batching happened under load


def test_sampled_request_runs_alone_and_repeats_with_its_seed(llama_bank, reference):
    request = {"input_ids": [5, 6, 7], "adapter": A2, "max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "seed": 7}
    first, second = concurrently([lambda: ask(llama_bank.url, **request)] * 2)
    expected = reference("llama-bank").generate([5, 6, 7], A2, 8, do_sample=True, temperature=1.5, seed=7)
    assert first.outputs["output_ids"] == second.outputs["output_ids"] == expected
    assert first.batch_size == second.batch_size == 1


def test_stop_strings_cut_each_row_as_alone_in_request_batching(llama_bank, reference):
    """Request batching runs a row with stop strings alone (a batch shares one set of options): each
    answer ends at its own stop string, and the rows without one are not cut."""
    ref = reference("llama-bank")
    full = ref.generate([5, 6, 7], A1, 20)
    stop = ref.decode(full)[3:5]
    requests = [{"input_ids": [5, 6, 7], "adapter": A1, "max_new_tokens": 20, "stop": [stop]},
                {"input_ids": [5, 6, 7], "adapter": A1, "max_new_tokens": 20},
                {"input_ids": [8, 9], "adapter": A2, "max_new_tokens": 20}]
    answers = concurrently([lambda r=r: ServeClient(llama_bank.url).generate(**r) for r in requests])
    shortest = next(n for n in range(1, len(full) + 1) if stop in ref.decode(full[:n]))
    assert answers[0].outputs["output_ids"] == full[:shortest] and shortest < len(full)
    assert answers[0].batch_size == 1
    assert answers[1].outputs["output_ids"] == full
    assert answers[2].outputs["output_ids"] == ref.generate([8, 9], A2, 20)


def test_merged_export_serves_the_base_only(start_server, reference):
    server = start_server(folder("llama-merged"), "--drain-timeout", "10")
    with ServeClient(server.url) as client:
        answer = client.generate(input_ids=[5, 6, 7], max_new_tokens=4)
        assert answer.outputs["output_ids"] == reference("llama-merged").generate([5, 6, 7], None, 4)
        with pytest.raises(ServeError, match="adapter 'llama-a1' is not loaded"):
            client.generate(input_ids=[5, 6, 7], adapter=A1, max_new_tokens=4)
        assert client.adapters("list") == {"adapters": [], "in_use": {}, "mode": "merged"}
