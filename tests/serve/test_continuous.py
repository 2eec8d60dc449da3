"""`serve --batching continuous` (the default): requests join and leave the running batch at every
decode step, stream their tokens, and every answer still equals the same request run alone
(IA3Session here, PEFT's own tokens for the shipped adapters); the OpenAI-compatible API on top."""
from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import concurrently, folder
from prepare import LONG
from test_generate import A1, A2

from ia3_export.serve import ServeClient, ServeError
from ia3_export.serve.process import ServerProcess, free_ports


@pytest.fixture(scope="module")
def wide(start_server):
    """A model whose decode steps take milliseconds: what the timing tests watch (the tiny one decodes
    100 tokens faster than Triton sends one response)."""
    port = free_ports(1)[0]
    server = start_server(folder("llama-wide-bank"), "--openai-port", str(port), "--drain-timeout", "10")
    server.openai = f"http://127.0.0.1:{port}/v1"
    return server


def post_openai(base: str, path: str, body) -> tuple[int, str]:
    """(HTTP status, the answer's text, or its error's message) of a POST to the OpenAI front; bytes are
    sent as they are."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/{path}", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]["message"]


def streamed(url: str, **request) -> tuple[list[int], str, list[float], str]:
    """(tokens, text, arrival time of each response from the request's start, finish reason)."""
    tokens, text, times, reason, start = [], "", [], "", time.monotonic()
    with ServeClient(url) as client:
        for event in client.stream(**request):
            times.append(time.monotonic() - start)
            tokens += event.get("output_ids", [])
            text += event["text"]
            reason = event["finish_reason"]
    return tokens, text, times, reason


def test_requests_arriving_mid_generation_equal_alone(wide, reference):
    """Twelve requests (mixed adapters, prompt lengths and lengths of 4 to 60 tokens) arrive 30 ms apart,
    so each joins a batch that is already decoding and others leave it while it runs. On the wide model
    a 60-token request decodes for longer than the gap on any machine (the tiny one can finish it first,
    and then nothing ever decodes together)."""
    ref = reference("llama-wide-bank")
    requests = [{"input_ids": list(range(5, 7 + 3 * i)), "adapter": ("wide-a1", "wide-a2", None)[i % 3],
                 "max_new_tokens": (4, 60, 17, 33)[i % 4]} for i in range(12)]
    calls = [lambda i=i, r=r: (time.sleep(0.03 * i), streamed(wide.url, **r))[1] for i, r in enumerate(requests)]
    answers = concurrently(calls)
    for request, answer in zip(requests, answers):
        assert not isinstance(answer, Exception), answer
        tokens, text, _, reason = answer
        expected = ref.generate(request["input_ids"], request["adapter"], request["max_new_tokens"])
        assert tokens == expected, request
        assert text == ref.decode(expected)
        assert reason == ("length" if len(expected) == request["max_new_tokens"] else "stop")
    stats = ServeClient(wide.url).adapters("stats")
    assert stats["engine"]["largest_batch"] > 1  # the requests really decoded together


def test_shipped_adapters_equal_peft_own_tokens(continuous):
    """PEFT's greedy tokens (computed by prepare.py with transformers and peft) for both shipped adapters."""
    with open(folder("peft_greedy.json")) as f:
        cases = json.load(f)
    answers = concurrently([lambda c=c: streamed(continuous.url, input_ids=c["input_ids"], adapter=c["adapter"],
                                                 max_new_tokens=c["max_new_tokens"]) for c in cases])
    assert [a[0] for a in answers] == [c["tokens"] for c in cases]


def test_tokens_arrive_while_the_request_generates(wide):
    """On a model whose steps take milliseconds (the tiny one finishes 100 tokens before Triton sends
    its first response), the first tokens arrive long before the last."""
    tokens, _, times, _ = streamed(wide.url, input_ids=[5, 6, 7], adapter="wide-a1", max_new_tokens=LONG // 4)
    assert len(tokens) == LONG // 4 and len(times) > 10
    assert times[0] < 0.3 * times[-1], times


def test_a_short_request_does_not_wait_for_a_long_one(wide):
    """A 4-token request sent while a 500-token one decodes ends long before it (whole-request batching
    would make it wait for all 500 steps, or run the long one after it)."""
    long_done, short = threading.Event(), {}

    def long():
        streamed(wide.url, input_ids=[9, 8, 7], adapter="wide-a1", max_new_tokens=LONG // 4)
        long_done.set()

    thread = threading.Thread(target=long)
    thread.start()
    time.sleep(0.15)  # the long request is decoding
    short["answer"] = streamed(wide.url, input_ids=[5, 6], adapter="wide-a1", max_new_tokens=4)
    short["long_done_first"] = long_done.is_set()
    thread.join(60)
    assert len(short["answer"][0]) == 4 and not short["long_done_first"]


def test_stop_strings_and_sampling_with_a_seed(continuous, reference):
    ref = reference("llama-bank")
    tokens, text, _, _ = streamed(continuous.url, input_ids=[5, 6, 7], adapter=A1, max_new_tokens=30,
                                  do_sample=True, temperature=1.5, seed=7)
    assert tokens == ref.generate([5, 6, 7], A1, 30, do_sample=True, temperature=1.5, seed=7)
    stop = ref.decode(tokens)[3:5]
    cut, cut_text, _, reason = streamed(continuous.url, input_ids=[5, 6, 7], adapter=A1, max_new_tokens=30,
                                        do_sample=True, temperature=1.5, seed=7, stop=[stop])
    assert reason == "stop" and stop in cut_text and cut == tokens[:len(cut)] and len(cut) < len(tokens)


def test_bad_stream_requests_get_their_error(continuous):
    with ServeClient(continuous.url) as client:
        with pytest.raises(ServeError, match="adapter 'nope' is not loaded"):
            list(client.stream(input_ids=[5, 6], adapter="nope", max_new_tokens=3))
        with pytest.raises(ServeError, match="the prompt is empty"):
            list(client.stream(input_ids=[], max_new_tokens=3))
        assert client.generate(input_ids=[5, 6], adapter=A1, max_new_tokens=3).outputs["output_ids"]  # still serving


def test_non_streaming_generate_joins_the_engine(continuous, reference):
    ref = reference("llama-bank")
    requests = [{"input_ids": [5, 6, 7 + i], "adapter": (A1, A2)[i % 2], "max_new_tokens": 5 + i} for i in range(4)]
    answers = concurrently([lambda r=r: ServeClient(continuous.url).generate(**r) for r in requests])
    for request, answer in zip(requests, answers):
        assert answer.outputs["output_ids"] == ref.generate(request["input_ids"], request["adapter"], request["max_new_tokens"])


def test_a_whole_answer_sent_while_another_decodes_joins_it_and_ends_first(wide, reference):
    """Non-streaming `generate` on the engine: pytriton holds a model instance until its Triton batch
    ends, so with the one instance of old a short request sent while a long one decoded waited for the
    long one to end. The engine's default instances let it join the running batch: it ends first, and
    both answers are the requests alone."""
    ref = reference("llama-wide-bank")
    long = {"input_ids": [5, 6], "adapter": "wide-a1", "max_new_tokens": LONG // 4}
    short = {"input_ids": [7, 8, 9], "adapter": "wide-a2", "max_new_tokens": 4}
    ended = {}

    def send(name, request):
        tokens = ServeClient(wide.url).generate(**request).outputs["output_ids"]
        ended[name] = time.monotonic()
        return tokens

    thread = threading.Thread(target=lambda: ended.setdefault("long tokens", send("long", long)))
    thread.start()
    deadline = time.monotonic() + 10
    while not ServeClient(wide.url).adapters("stats")["engine"]["active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert send("short", short) == ref.generate(short["input_ids"], short["adapter"], short["max_new_tokens"])
    thread.join(60)
    assert ended["short"] < ended["long"]
    assert ended["long tokens"] == ref.generate(long["input_ids"], long["adapter"], long["max_new_tokens"])


def test_non_streaming_generate_stops_at_stop_strings_as_generate_stream(continuous, reference):
    """The `generate` model reads the `stop` parameter as generate_stream does (it once ignored it and ran
    to max_new_tokens), and refuses `logprobs`, which only generate_stream answers."""
    ref = reference("llama-bank")
    tokens = ref.generate([5, 6, 7], A1, 30)
    stop = ref.decode(tokens)[4:6]
    cut = ServeClient(continuous.url).generate(input_ids=[5, 6, 7], adapter=A1, max_new_tokens=30, stop=[stop])
    assert cut.outputs["output_ids"] == streamed(continuous.url, input_ids=[5, 6, 7], adapter=A1, max_new_tokens=30,
                                                 stop=[stop])[0]
    shortest = next(n for n in range(1, len(tokens) + 1) if stop in ref.decode(tokens[:n]))
    assert cut.outputs["output_ids"] == tokens[:shortest] and shortest < len(tokens)
    with pytest.raises(ServeError, match="parameter `logprobs` is answered by generate_stream only"):
        ServeClient(continuous.url).infer("generate", {"input_ids": [5, 6], "adapter": A1, "max_new_tokens": 3},
                                          {"logprobs": 2})


def test_openai_client_completions_chat_and_models(continuous, reference):
    import openai
    ref = reference("llama-bank")
    client = openai.OpenAI(base_url=continuous.openai, api_key="unused")
    assert [m.id for m in client.models.list()] == ["llama-bank", A1, A2]
    expected = ref.decode(ref.generate(ref.encode("the cat "), A1, 12))
    done = client.completions.create(model=A1, prompt="the cat ", max_tokens=12)
    assert done.choices[0].text == expected and done.usage.completion_tokens == 12
    pieces = [c.choices[0].text for c in client.completions.create(model=A1, prompt="the cat ", max_tokens=12, stream=True)]
    assert "".join(pieces) == expected
    base = client.completions.create(model="llama-bank", prompt="the cat ", max_tokens=12)
    assert base.choices[0].text == ref.decode(ref.generate(ref.encode("the cat "), None, 12))
    with pytest.raises(openai.NotFoundError, match="The model `nope` does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    # chat: the folder's template (BOS written by it), the same ids as the prompt sent by hand
    messages = [{"role": "user", "content": "hi"}]
    prompt = ref.session.tokenizer().encode("<s><|user|>\nhi</s>\n<|assistant|>\n")
    chat = client.chat.completions.create(model=A2, messages=messages, max_tokens=8)
    assert chat.choices[0].message.content == ref.decode(ref.generate(prompt, A2, 8))
    streamed_chat = client.chat.completions.create(model=A2, messages=messages, max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed_chat) == chat.choices[0].message.content


def test_openai_usage_in_streams_one_model_and_parameters_not_implemented(continuous, reference):
    """`stream_options.include_usage` (the last chunk: no choices, the request's usage), GET /v1/models/{id},
    and a parameter that would change the answer but is not implemented is refused by name, while the
    values that mean "off" (which clients such as LangChain send) pass."""
    import openai
    ref = reference("llama-bank")
    client = openai.OpenAI(base_url=continuous.openai, api_key="unused")
    chunks = list(client.completions.create(model=A1, prompt="the cat ", max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    expected = ref.generate(ref.encode("the cat "), A1, 12)
    assert "".join(c.choices[0].text for c in chunks[:-1]) == ref.decode(expected)
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(ref.encode("the cat ")), 12)
    chat = list(client.chat.completions.create(model=A2, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                               stream=True, stream_options={"include_usage": True}))
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens == 8
    assert client.models.retrieve(A1).parent == "llama-bank" and client.models.retrieve("llama-bank").parent is None
    with pytest.raises(openai.NotFoundError, match="The model `nope` does not exist"):
        client.models.retrieve("nope")
    for refused in ({"best_of": 3}, {"suffix": "x"}, {"extra_body": {"tools": [{"type": "function"}]}},
                    {"extra_body": {"response_format": {"type": "json_object"}}}):
        field = next(iter(refused.get("extra_body", refused)))
        with pytest.raises(openai.BadRequestError, match=f"`{field}` is not implemented by this server"):
            client.completions.create(model=A1, prompt="the cat ", max_tokens=4, **refused)
    with pytest.raises(openai.BadRequestError, match="`stream_options` needs"):
        client.completions.create(model=A1, prompt="the cat ", max_tokens=4, stream_options={"include_usage": True})
    off = client.completions.create(model=A1, prompt="the cat ", max_tokens=12, presence_penalty=0, frequency_penalty=0,
                                    logprobs=None, echo=False, best_of=1, n=1, extra_body={"top_k": -1})
    assert off.choices[0].text == ref.decode(expected)


CARELESS = [  # (endpoint, body, what the 400 says): each once answered 200 or with Triton's own words
    ("completions", {"prompt": "hi", "max_tokens": 1.5}, "`max_tokens` must be an integer, got 1.5"),
    ("completions", {"prompt": "hi", "seed": 2**70, "temperature": 1}, "`seed` is out of range"),
    ("completions", {"prompt": "hi", "max_tokens": 2**32 + 5}, "`max_tokens` is out of range, got 4294967301"),  # was 5
    ("completions", {"prompt": [5, -1, 6]}, "a list of token ids >= 0"),
    ("completions", {"prompt": "hi", "stop": 5}, "`stop` must be a string or a list of strings"),
    ("completions", {"prompt": "hi", "stream": "yes"}, "`stream` must be true or false"),
    ("completions", {"prompt": "hi", "model": [A1]}, "`model` must be a string"),
    ("completions", {"prompt": "hi", "stop": [f"s{i}" for i in range(65)]}, "65 stop strings, more than the 64"),
    ("completions", {"prompt": [5, 6, 7], "max_tokens": 200, "stream": True},  # was an error event in a 200 stream
     "the prompt has 3 tokens and 200 new tokens were asked, over this model's limit of 128"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "each message needs a `content`"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     "parts must all be text"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": "8"},
     "`max_completion_tokens` must be an integer"),
]


@pytest.mark.parametrize("path,body,message", CARELESS,
                         ids=[m.split("`")[1] if "`" in m else m.split()[0] for _, _, m in CARELESS])
def test_careless_openai_requests_get_a_clear_400(continuous, path, body, message):
    status, answer = post_openai(continuous.openai, path, {"model": A1, **body})
    assert (status, message in answer) == (400, True), answer


HOSTILE_JSON = [  # (raw body, what the 400 says): each once got an HTTP 500 with a traceback in the log
    (b'{"prompt": "hi", "temperature": NaN}', "holds NaN, which JSON does not allow"),
    (b'{"prompt": "hi", "top_p": Infinity}', "holds Infinity, which JSON does not allow"),
    (b'{"prompt": "hi", "temperature": 1e999}', "holds the number 1e999, past a float's range"),
    (b'{"prompt": "hi \\ud800 there"}', "a lone UTF-16 surrogate"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests deeper than this server reads"),
    (b'{"prompt": "\xff\xfe"}', "is not UTF-8 (byte 0xff at offset 12)"),
]


@pytest.mark.parametrize("body,message", HOSTILE_JSON, ids=["nan", "infinity", "1e999", "surrogate", "nested", "utf8"])
def test_json_that_python_reads_but_json_forbids_gets_a_400(continuous, body, message):
    """Every route reads its body through one reader (openai_schema.parse_json): completions, chat and
    the adapter and tokenizer routes all refuse these, and the server goes on."""
    root = continuous.openai.removesuffix("/v1")
    for path in ("v1/completions", "v1/chat/completions", "tokenize", "detokenize", "v1/load_lora_adapter"):
        status, answer = post_openai(root, path, body)
        assert (status, message in answer) == (400, True), (path, answer)
    assert post_openai(continuous.openai, "completions", {"model": A1, "prompt": "hi", "max_tokens": 2})[0] == 200


def test_parameters_that_are_not_utf8_get_one_line_on_both_generate_models(continuous, reference):
    """Triton's generate endpoints pass a body's unknown fields on as parameters, and pytriton's stub read them
    unguarded: `generate` answered a 400 with the stub's traceback, and `generate_stream` never answered
    (the connection held for good, and a stop waited --drain-timeout for it). Both now answer the one-line
    `error`, and the server serves on."""
    import http.client
    for model in ("generate", "generate_stream"):
        connection = http.client.HTTPConnection("127.0.0.1", continuous.http, timeout=15)
        body = b'{"input_ids": [5, 6, 7], "adapter": "%s", "max_new_tokens": 3, "note": "\xff\xfe"}' % A1.encode()
        connection.request("POST", f"/v2/models/{model}/{model}", body, {"Content-Type": "application/json"})
        answer = connection.getresponse().read().decode()
        connection.close()
        assert "the request's parameters cannot be read (UnicodeDecodeError" in answer and "Traceback" not in answer
    expected = reference("llama-bank").generate([5, 6, 7], A1, 3)
    assert ServeClient(continuous.url).generate(input_ids=[5, 6, 7], adapter=A1, max_new_tokens=3).outputs[
        "output_ids"] == expected


def test_a_huge_name_comes_back_clipped(continuous):
    """A 10,000-character model or adapter name once came back whole in every error body."""
    root, huge = continuous.openai.removesuffix("/v1"), "x" * 10_000
    for path, body, status in (("v1/completions", {"model": huge, "prompt": "hi"}, 404),
                               ("v1/load_lora_adapter", {"lora_name": huge, "lora_path": folder("llama-a3")}, 400),
                               ("v1/unload_lora_adapter", {"lora_name": huge}, 404)):
        answer = post_openai(root, path, body)
        assert answer[0] == status and len(answer[1]) < 400 and "(10,00" in answer[1], (path, answer[1][:500])


def test_a_huge_body_is_refused_before_it_is_read(continuous):
    """12 MB of token ids (over 8x --max-text-bytes + 1 MiB): a 413 naming the limit, or the connection
    closed while the client still sends, and the server goes on (it once read the whole body first)."""
    request = urllib.request.Request(f"{continuous.openai}/completions", b'{"prompt": [' + b"5," * 6_000_000 + b'5]}',
                                     {"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=30)
        raise AssertionError("a 12 MB body was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 413 and "the request body is over 9437184 bytes" in e.read().decode()
    except urllib.error.URLError as e:
        assert isinstance(e.reason, (ConnectionResetError, BrokenPipeError)), e
    assert post_openai(continuous.openai, "completions", {"model": A1, "prompt": "hi", "max_tokens": 2})[0] == 200


def test_a_body_that_trickles_in_is_refused_in_time():
    """A completion's place is held while its body arrives: one sent a byte at a time (or never finished)
    is refused 408 once the body's time is up, instead of holding the place for good."""
    from ia3_export.serve.openai_schema import APIError, read_json

    class Trickling:
        async def stream(self):
            yield b'{"prompt": '
            await asyncio.sleep(3600)

    with pytest.raises(APIError, match=r"did not arrive within 0.2 s \(11 bytes came\)") as refused:
        asyncio.run(read_json(Trickling(), 1000, timeout_s=0.2))
    assert refused.value.status == 408


def test_chat_content_as_text_parts_is_the_same_prompt(continuous):
    """OpenAI's content parts ([{"type": "text", "text": ...}]), which many clients send, are joined into
    the message's text (a template would otherwise render the list's repr into the prompt)."""
    import openai
    client = openai.OpenAI(base_url=continuous.openai, api_key="unused")
    plain = client.chat.completions.create(model=A2, messages=[{"role": "user", "content": "hi\nthere"}], max_tokens=8)
    parts = client.chat.completions.create(model=A2, max_tokens=8, messages=[
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens


def test_health_on_the_openai_port_follows_triton(continuous, tmp_path):
    """GET /health (vLLM's probe) is 200 with an empty body while Triton is ready, and 503 when Triton does
    not answer (the same app pointed at a closed port)."""
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from ia3_export.serve.openai_api import create_app
    with urllib.request.urlopen(f"{continuous.openai[:-3]}/health", timeout=10) as response:
        assert (response.status, response.read()) == (200, b"")
    closed = free_ports(1)[0]
    server = SimpleNamespace(url=f"http://127.0.0.1:{closed}", streams=None, served=SimpleNamespace(pool=None),
                             config=SimpleNamespace(served_model_name="m", max_text_bytes=1024, api_key=None, max_batch=1,
                                                    max_queue=1),
                             access_headers={},
                             session=SimpleNamespace(folder=SimpleNamespace(path=str(tmp_path))))
    with TestClient(create_app(server)) as client:
        answer = client.get("/health")
    assert answer.status_code == 503 and "not ready" in answer.json()["error"]["message"]


def test_a_chat_without_max_tokens_runs_to_its_end(continuous, reference):
    """OpenAI's chat default: no max_tokens means until EOS or the end of the model's context (128
    positions here), not the 16 tokens a completion gets."""
    import openai
    ref = reference("llama-bank")
    client = openai.OpenAI(base_url=continuous.openai, api_key="unused")
    prompt = ref.session.tokenizer().encode("<s><|user|>\nhi</s>\n<|assistant|>\n")
    chat = client.chat.completions.create(model=A2, messages=[{"role": "user", "content": "hi"}])
    expected = ref.generate(prompt, A2, 128 - len(prompt))
    assert chat.choices[0].message.content == ref.decode(expected) and chat.usage.completion_tokens == len(expected) > 16
    assert chat.choices[0].finish_reason == ("length" if len(expected) == 128 - len(prompt) else "stop")
    assert client.completions.create(model=A2, prompt="the cat ").usage.completion_tokens <= 16  # a completion's default


def scrape(base: str) -> dict:
    """GET /metrics on the OpenAI port: {(name, labels as a sorted tuple): value}, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"{base[:-3]}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_show_the_engine_and_the_adapters_in_use(wide):
    """While a 500-token request decodes: one running, on its adapter; after it: none running and one more
    finished for "length" (vLLM's names with ia3's prefix: an autoscaler reads the queue depth the same way)."""
    before = scrape(wide.openai)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (streamed(wide.url, input_ids=[5, 6], adapter="wide-a2",
                                                       max_new_tokens=LONG // 4), done.set()))
    thread.start()
    deadline = time.monotonic() + 10
    while not ServeClient(wide.url).adapters("stats")["engine"]["active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    during = scrape(wide.openai)
    thread.join(60)
    after = scrape(wide.openai)
    assert done.is_set() and not ServeClient(wide.url).adapters("stats")["engine"]["active"]
    assert during[("ia3:num_requests_running", ())] == 1 and during[("ia3:num_requests_waiting", ())] == 0
    assert during[("ia3:adapter_requests_running", (("adapter", "wide-a2"),))] == 1
    assert 0 < during[("ia3:kv_cache_usage_perc", ())] < 1 and during[("ia3:adapters_loaded", ())] == 2
    assert after[("ia3:num_requests_running", ())] == 0 and after[("ia3:kv_cache_usage_perc", ())] == 0
    key = ("ia3:request_finished_total", (("finished_reason", "length"),))
    assert after[key] == before.get(key, 0) + 1
    assert ("ia3:adapter_requests_running", (("adapter", "wide-a2"),)) not in after


def test_metrics_time_each_request_and_count_its_tokens(wide):
    """vLLM's request histograms and token counters (`ia3:` prefix): after three streamed requests, the
    counters grew by the prompt ids sent and the tokens received; each histogram counted three requests,
    their first-token seconds within their end-to-end seconds and those within what the client waited;
    buckets are cumulative up to +Inf = the count."""
    requests = [{"input_ids": list(range(5, 5 + n)), "adapter": a, "max_new_tokens": m}
                for n, a, m in ((3, "wide-a1", 40), (7, None, 12), (2, "wide-a2", 25))]
    before = scrape(wide.openai)
    answers = []
    for request in requests:
        start = time.monotonic()
        tokens, *_ = streamed(wide.url, **request)
        answers.append((tokens, time.monotonic() - start))
    after = scrape(wide.openai)

    def grew(name):
        return after[(name, ())] - before.get((name, ()), 0)

    assert grew("ia3:prompt_tokens_total") == sum(len(r["input_ids"]) for r in requests)
    assert grew("ia3:generation_tokens_total") == sum(len(tokens) for tokens, _ in answers) > 3
    for name in ("ia3:time_to_first_token_seconds", "ia3:time_per_output_token_seconds",
                 "ia3:e2e_request_latency_seconds"):
        assert grew(f"{name}_count") == 3
        buckets = sorted((float(dict(labels)["le"]), value)
                         for (n, labels), value in after.items() if n == f"{name}_bucket")
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)
        assert buckets[-1] == (math.inf, after[(f"{name}_count", ())])
    first, whole = grew("ia3:time_to_first_token_seconds_sum"), grew("ia3:e2e_request_latency_seconds_sum")
    assert 0 < first < whole <= sum(waited for _, waited in answers)
    per_token = grew("ia3:time_per_output_token_seconds_sum")  # three means, each under its request's whole time
    assert 0 < per_token < whole


def test_tokenize_and_detokenize_as_vllm(continuous, reference):
    """/tokenize gives the ids a completion (its text) or a chat (its messages, through the template) is
    decoded from; /detokenize the text an answer's ids read as; bad input is a 400, an unknown model a 404."""
    ref, root = reference("llama-bank"), continuous.openai[:-3]  # beside /v1, as vLLM's
    status, answer = post_openai(root, "tokenize", {"model": A1, "prompt": "the cat "})
    assert status == 200 and json.loads(answer) == {"count": len(ref.encode("the cat ")), "max_model_len": 128,
                                                    "tokens": ref.encode("the cat ")}
    messages = [{"role": "user", "content": "hi"}]
    chat = json.loads(post_openai(root, "tokenize", {"messages": messages})[1])
    assert chat["tokens"] == ref.session.tokenizer().encode("<s><|user|>\nhi</s>\n<|assistant|>\n")
    ids = ref.generate([5, 6, 7], A1, 12)
    status, answer = post_openai(root, "detokenize", {"tokens": ids})
    assert (status, json.loads(answer)) == (200, {"prompt": ref.decode(ids)})
    assert post_openai(root, "detokenize", {"tokens": [5, 99999]}) == (
        400, "`tokens` must be a list of token ids from 0 to 319")
    assert post_openai(root, "tokenize", {"prompt": 5}) == (400, "`prompt` must be a non-empty string")
    assert post_openai(root, "tokenize", {"model": "nope", "prompt": "a"})[0] == 404


def test_loaded_adapters_are_bounded_by_max_adapters(start_server):
    """Names are the client's to choose, so one adapter folder loaded under ever new names filled the memory
    (3,000 names were taken; on a 7B Llama each holds ~1.7 MB): --max-adapters bounds the adapters loaded at
    once, through the OpenAI route and Triton's `adapters` model alike, an unload frees a place, and a
    start-up past it is refused."""
    port = free_ports(1)[0]
    server = start_server(folder("llama-bank"), "--openai-port", str(port), "--max-adapters", "3")
    api, source = f"http://127.0.0.1:{port}/v1", folder("llama-a3")
    assert post_openai(api, "load_lora_adapter", {"lora_name": "n3", "lora_path": source})[0] == 200  # 2 shipped + 1
    status, message = post_openai(api, "load_lora_adapter", {"lora_name": "n4", "lora_path": source})
    assert status == 400 and "3 adapters are loaded, the most this server holds (--max-adapters 3)" in message
    with pytest.raises(ServeError, match=r"the most this server holds \(--max-adapters 3\)"):
        ServeClient(server.url).adapters("load", name="n5", source=source)
    assert post_openai(api, "unload_lora_adapter", {"lora_name": "n3"})[0] == 200
    assert post_openai(api, "load_lora_adapter", {"lora_name": "n4", "lora_path": source})[0] == 200
    assert ServeClient(server.url).adapters("list")["adapters"] == [A1, A2, "n4"]
    exe = os.path.join(os.path.dirname(sys.executable), "ia3-export")
    done = subprocess.run([exe, "serve", folder("llama-bank"), "--max-adapters", "1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "make 2, more than --max-adapters 1" in done.stderr, done.stderr


def test_vllm_runtime_adapter_loading(continuous, reference):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: the adapter is listed and answers as the
    same adapter run alone; a name already loaded, or not loaded, gets a clear error."""
    import openai
    ref = reference("llama-bank")
    ref.load(folder("llama-a3"))
    client = openai.OpenAI(base_url=continuous.openai, api_key="unused")

    def post(path, body):
        return post_openai(continuous.openai, path, body)

    assert post("load_lora_adapter", {"lora_name": "llama-a3", "lora_path": folder("llama-a3")}) == (
        200, "Success: LoRA adapter 'llama-a3' added successfully.")
    try:
        assert [m.id for m in client.models.list()] == ["llama-bank", A1, A2, "llama-a3"]
        done = client.completions.create(model="llama-a3", prompt=[5, 6, 7], max_tokens=10)
        assert done.choices[0].text == ref.decode(ref.generate([5, 6, 7], "llama-a3", 10))
        status, message = post("load_lora_adapter", {"lora_name": "llama-a3", "lora_path": folder("llama-a3")})
        assert status == 400 and "adapter 'llama-a3' is already loaded" in message
        status, message = post("load_lora_adapter", {"lora_name": "x", "lora_path": folder("llama-a3") + "-missing"})
        assert status == 400 and "x" not in [m.id for m in client.models.list()], message
        assert post("load_lora_adapter", {"lora_name": "llama-a4"})[0] == 400  # no lora_path
        status, message = post("load_lora_adapter", {"lora_name": "../a3", "lora_path": folder("llama-a3")})
        assert status == 400 and "adapter name '../a3' is not allowed" in message
    finally:
        unloaded = post("unload_lora_adapter", {"lora_name": "llama-a3"})
    assert unloaded == (200, "Success: LoRA adapter 'llama-a3' removed successfully.")
    status, message = post("unload_lora_adapter", {"lora_name": "llama-a3"})
    assert status == 404 and "adapter 'llama-a3' is not loaded" in message
    with pytest.raises(openai.NotFoundError, match="The model `llama-a3` does not exist"):
        client.completions.create(model="llama-a3", prompt=[5, 6, 7], max_tokens=2)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("prompt", [[5, 6, 7], [[5, 6, 7], [8, 9]]], ids=["one prompt", "two prompts"])
def test_a_client_that_disconnects_stops_costing_steps(wide, prompt, stream):
    """The OpenAI front sees the disconnect and cancels the request in the engine at once (every prompt's
    row, when it sent several), streamed or not (a whole answer's client that left once cost every step to
    its last token)."""
    cancelled = ServeClient(wide.url).adapters("stats")["engine"]["finished"].get("cancelled", 0)
    body = json.dumps({"model": "wide-a1", "prompt": prompt, "max_tokens": LONG, "stream": stream}).encode()
    port = int(wide.openai.split(":")[-1].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while not ServeClient(wide.url).adapters("stats")["engine"]["active"] and time.monotonic() < deadline:
            time.sleep(0.01)  # until the request is decoding
    deadline = time.monotonic() + 5
    while ServeClient(wide.url).adapters("stats")["engine"]["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = ServeClient(wide.url).adapters("stats")["engine"]
    rows = len(prompt) if isinstance(prompt[0], list) else 1
    assert stats["active"] == 0 and stats["finished"].get("cancelled", 0) - cancelled == rows


def test_several_prompts_in_one_completion_equal_alone(continuous, reference):
    """OpenAI's `prompt` as a list of prompts (LangChain sends its batches so): one choice per prompt, in
    order, each the prompt alone; streamed chunks name their choice; usage is the sum; one bad prompt
    fails the request, and more prompts than --max-queue are refused."""
    import openai
    ref = reference("llama-bank")
    client = openai.OpenAI(base_url=continuous.openai, api_key="unused")
    prompts = ["the cat ", [5, 6, 7], "hello there", [40, 41]]
    ids = [ref.encode(p) if isinstance(p, str) else p for p in prompts]
    expected = [ref.decode(ref.generate(i, A1, 10)) for i in ids]
    done = client.completions.create(model=A1, prompt=prompts, max_tokens=10)
    assert [(c.index, c.text) for c in done.choices] == list(enumerate(expected))
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (sum(map(len, ids)), 40)
    pieces = [""] * len(prompts)
    chunks = list(client.completions.create(model=A1, prompt=prompts, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}))
    for chunk in chunks[:-1]:
        pieces[chunk.choices[0].index] += chunk.choices[0].text
    assert pieces == expected and chunks[-1].usage.total_tokens == sum(map(len, ids)) + 40
    with pytest.raises(openai.BadRequestError, match="input_ids holds 99999, outside the vocabulary"):
        client.completions.create(model=A1, prompt=[[5, 6], [99999]], max_tokens=10)
    with pytest.raises(openai.BadRequestError, match="`prompt` holds 257 prompts, more than the 256"):
        client.completions.create(model=A1, prompt=["a"] * 257, max_tokens=2)
    deadline = time.monotonic() + 5
    while ServeClient(continuous.url).adapters("stats")["engine"]["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ServeClient(continuous.url).adapters("stats")["engine"]["active"] == 0


def test_n_choices_each_equal_alone_with_their_seed(continuous, reference):
    """OpenAI's `n`: n choices per prompt in OpenAI's order (prompt by prompt); sampled with a seed, choice j
    equals the request alone seeded seed + j (as vLLM seeds a request's n children), so the choices differ
    and repeat; a chat streams every choice; the usage counts each prompt once."""
    import openai
    ref = reference("llama-bank")
    client = openai.OpenAI(base_url=continuous.openai, api_key="unused")
    prompts, sampling = [[5, 6, 7], [8, 9]], {"do_sample": True, "temperature": 1.5, "top_p": 0.95}
    alone = [ref.generate(p, A1, 8, seed=41 + j, **sampling) for p in prompts for j in range(3)]
    done = client.completions.create(model=A1, prompt=prompts, n=3, max_tokens=8, seed=41, temperature=1.5,
                                     top_p=0.95)
    assert [(c.index, c.text) for c in done.choices] == list(enumerate(map(ref.decode, alone)))
    assert len({tuple(a) for a in alone}) > 1
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (5, sum(map(len, alone)))
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=A2, messages=messages, n=2, max_tokens=6, seed=3, temperature=1.5)
    pieces = ["", ""]
    for chunk in client.chat.completions.create(model=A2, messages=messages, n=2, max_tokens=6, seed=3,
                                                temperature=1.5, stream=True):
        for c in chunk.choices:
            pieces[c.index] += c.delta.content or ""
    assert pieces == [c.message.content for c in chat.choices]
    prompt = ref.session.tokenizer().encode("<s><|user|>\nhi</s>\n<|assistant|>\n")
    assert pieces == [ref.decode(ref.generate(prompt, A2, 6, do_sample=True, temperature=1.5, seed=3 + j))
                      for j in range(2)]
    for bad in (0, 1.5, "2", True):
        with pytest.raises(openai.BadRequestError, match="`n` must be an integer >= 1"):
            client.completions.create(model=A1, prompt=[5], max_tokens=2, n=bad)
    with pytest.raises(openai.BadRequestError, match=r"2 prompt\(s\) x `n` 200 = 400 choices, more than the 256"):
        client.completions.create(model=A1, prompt=prompts, max_tokens=2, n=200)


def logprobs_alone(ref, ids: list[int], adapter, tokens: list[int]):
    """float64 log_softmax of the model's logits over prompt + tokens in ONE forward without a cache: what
    the server's (cached, batched, streamed) log-probabilities must equal."""
    import numpy as np

    from ia3_export.runtime.generation import empty_cache, position_ids
    full = np.array([ids + tokens], np.int64)
    mask = np.ones_like(full)
    feeds = {"input_ids": full, "attention_mask": mask, "position_ids": position_ids(mask),
             **empty_cache(ref.session.graphs["model"], 1, "float32", ref.session.folder.cache)}
    logits = ref.session.run(feeds, "model", [adapter], ["logits"])["logits"][0].astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    return (logits - np.log(np.exp(logits).sum(-1, keepdims=True)))[len(ids) - 1:-1]


def test_openai_echo_scores_the_prompt_as_lm_eval_asks(continuous, reference):
    """lm-eval's loglikelihood through `local-completions`: token-id prompts in one request, `echo: true`,
    `logprobs: 1`, `max_tokens: 1`, greedy. Each choice's text is the prompt's then the answer's; its
    token_logprobs are null for the first prompt token, then every prompt and answer token's, equal to one
    uncached float64 forward; `max_tokens: 0` gives the prompt alone (vLLM's scoring call)."""
    import numpy as np
    import openai
    ref = reference("llama-bank")
    client = openai.OpenAI(base_url=continuous.openai, api_key="unused")
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42]]
    done = client.completions.create(model=A1, prompt=prompts, max_tokens=1, logprobs=1, echo=True, temperature=0)
    for prompt, got in zip(prompts, done.choices):
        answer = ref.generate(prompt, A1, 1)
        want = logprobs_alone(ref, prompt[:1], A1, prompt[1:] + answer)  # row k predicts token k + 1
        assert got.text == ref.decode(prompt) + ref.decode(answer)
        scores = got.logprobs.token_logprobs
        assert len(scores) == len(prompt) + 1 and scores[0] is None and got.logprobs.top_logprobs[0] is None
        assert np.allclose(scores[1:], [want[k, t] for k, t in enumerate(prompt[1:] + answer)], atol=1e-4)
        for k, top in enumerate(got.logprobs.top_logprobs[1:]):  # lm-eval's is_greedy reads these
            best = int(np.argmax(want[k]))
            assert list(top) == ref.session.tokenizer().pieces([best])
            assert np.isclose(list(top.values())[0], want[k, best], atol=1e-4)
    assert done.usage.prompt_tokens == sum(map(len, prompts)) and done.usage.completion_tokens == 2
    alone = client.completions.create(model=A1, prompt="the cat", max_tokens=0, logprobs=0, echo=True)
    ids = ref.session.tokenizer().encode("the cat")
    want = logprobs_alone(ref, ids[:1], A1, ids[1:])
    assert alone.choices[0].text == "the cat" and alone.usage.completion_tokens == 0
    scores = alone.choices[0].logprobs.token_logprobs
    assert np.allclose(scores[1:], [want[k, t] for k, t in enumerate(ids[1:])], atol=1e-4)
    assert alone.choices[0].logprobs.top_logprobs[1:] == [{}] * (len(ids) - 1)
    plain = client.completions.create(model=A1, prompt="the cat", max_tokens=3, echo=True)
    assert plain.choices[0].text == "the cat" + ref.decode(ref.generate(ids, A1, 3))
    assert plain.choices[0].logprobs is None
    for whole, request, echoed in (
            (done, {"prompt": prompts, "max_tokens": 1, "logprobs": 1, "temperature": 0},
             [ref.decode(p) for p in prompts]),
            (alone, {"prompt": "the cat", "max_tokens": 0, "logprobs": 0}, ["the cat"]),
            (plain, {"prompt": "the cat", "max_tokens": 3}, ["the cat"])):  # streamed: the same, its prompt first
        chunks = list(client.completions.create(model=A1, echo=True, stream=True, **request,
                                                stream_options={"include_usage": True}))
        for i, want_choice in enumerate(whole.choices):
            mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
            assert mine[0].text.startswith(echoed[i]) and "".join(c.text for c in mine) == want_choice.text
            assert mine[-1].finish_reason == want_choice.finish_reason
            if want_choice.logprobs is not None:
                assert sum((c.logprobs.token_logprobs for c in mine), []) == want_choice.logprobs.token_logprobs
                assert sum((c.logprobs.top_logprobs for c in mine), []) == want_choice.logprobs.top_logprobs
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
            whole.usage.prompt_tokens, whole.usage.completion_tokens)
    status, answer = post_openai(continuous.openai, "completions", {"model": A1, "prompt": "hi", "echo": "yes"})
    assert status == 400 and "`echo` must be true or false" in answer, answer
    status, answer = post_openai(continuous.openai, "chat/completions",
                                 {"model": A1, "messages": [{"role": "user", "content": "hi"}], "echo": True})
    assert status == 400 and "`echo` is not implemented" in answer
    # underneath: generate_stream's `prompt_logprobs` parameter, answered on the first response
    first = next(ServeClient(continuous.url).stream(input_ids=[5, 6, 7], adapter=A1, max_new_tokens=2,
                                                    prompt_logprobs=2))
    scored, want = json.loads(first["prompt_logprobs"]), logprobs_alone(ref, [5], A1, [6, 7])
    assert [e[0] for e in scored] == [5, 6, 7] and scored[0][1:] == [None, None]
    assert np.allclose([e[1] for e in scored[1:]], [want[0, 6], want[1, 7]], atol=1e-4)
    assert [[i for i, _ in e[2]] for e in scored[1:]] == [np.argsort(-w, kind="stable")[:2].tolist() for w in want]
    with pytest.raises(ServeError, match="parameter `prompt_logprobs` is answered by generate_stream only"):
        ServeClient(continuous.url).infer("generate", {"input_ids": [5, 6], "adapter": A1, "max_new_tokens": 3},
                                          {"prompt_logprobs": 2})


def test_openai_logprobs_are_the_models_own(continuous, reference):
    """A completion's `logprobs: k` and a chat's `logprobs` / `top_logprobs` in OpenAI's shapes: each token's
    log-probability and its k most likely alternatives equal one uncached float64 forward over prompt +
    answer; the tokens' texts join to the answer; streamed equals not streamed."""
    import numpy as np
    import openai
    ref = reference("llama-bank")
    client = openai.OpenAI(base_url=continuous.openai, api_key="unused")
    tokens = ref.generate([5, 6, 7], A1, 10)
    want = logprobs_alone(ref, [5, 6, 7], A1, tokens)
    text_of = {i: ref.session.tokenizer().pieces([i])[0] for i in range(want.shape[1])}
    done = client.completions.create(model=A1, prompt=[5, 6, 7], max_tokens=10, logprobs=3)
    got = done.choices[0].logprobs
    assert done.choices[0].text == ref.decode(tokens) and got.tokens == [text_of[t] for t in tokens]
    assert np.allclose(got.token_logprobs, [want[k, t] for k, t in enumerate(tokens)], atol=1e-4)
    for k, top in enumerate(got.top_logprobs):  # OpenAI's dict: two tokens of the same text are one key
        best = {text_of[i]: want[k, i] for i in np.argsort(-want[k], kind="stable")[:3]}
        assert list(top) == list(best) and np.allclose(list(top.values()), list(best.values()), atol=1e-4)
    assert got.text_offset == [sum(len(text_of[t]) for t in tokens[:k]) for k in range(len(tokens))]
    chunks = [c.choices[0].logprobs for c in client.completions.create(model=A1, prompt=[5, 6, 7], max_tokens=10,
                                                                         logprobs=3, stream=True)]
    assert sum((c.token_logprobs for c in chunks if c), []) == got.token_logprobs
    assert sum((c.text_offset for c in chunks if c), []) == got.text_offset
    # a chat: OpenAI's content list with bytes; the chosen token is the most likely (greedy)
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=A2, messages=messages, max_tokens=6, logprobs=True, top_logprobs=2)
    prompt = ref.session.tokenizer().encode("<s><|user|>\nhi</s>\n<|assistant|>\n")
    answer = ref.generate(prompt, A2, 6)
    want = logprobs_alone(ref, prompt, A2, answer)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [text_of[t] for t in answer] and all(c.bytes == list(c.token.encode())
                                                                               for c in content)
    assert np.allclose([c.logprob for c in content], [want[k, t] for k, t in enumerate(answer)], atol=1e-4)
    assert all(c.top_logprobs[0].token == c.token and len(c.top_logprobs) == 2 for c in content)
    streamed = client.chat.completions.create(model=A2, messages=messages, max_tokens=6, logprobs=True, top_logprobs=2,
                                              stream=True)
    assert sum((c.choices[0].logprobs.content for c in streamed if c.choices and c.choices[0].logprobs), []) == content
    for body, message in [({"logprobs": 21}, "`logprobs` must be an integer from 0 to 20"),
                          ({"logprobs": "3"}, "`logprobs` must be an integer from 0 to 20"),
                          ({"logprobs": 20, "n": 250, "max_tokens": 1000},  # ~250 MB of JSON from one request
                           "250 choice\\(s\\) of up to 1000 tokens with 20 alternatives each would answer 5250000")]:
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(model=A1, prompt=[5], **{"max_tokens": 2, **body})
    with pytest.raises(openai.BadRequestError, match="`top_logprobs` needs"):
        client.chat.completions.create(model=A2, messages=messages, max_tokens=2, top_logprobs=2)


def test_ready_only_once_every_model_is_loaded(tmp_path):
    """/v2/health/ready never answers 200 while a model is not ready (a probe would route traffic early)."""
    server, (http, grpc, metrics) = None, free_ports(3)  # ports known before it starts: watched from its first moment
    seen, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            codes = []
            for path in ("/v2/health/ready", "/v2/models/generate/ready", "/v2/models/generate_stream/ready"):
                try:
                    codes.append(urllib.request.urlopen(f"http://127.0.0.1:{http}{path}", timeout=1).status)
                except Exception as e:
                    codes.append(getattr(e, "code", 0))
            seen.append(codes)
            time.sleep(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        server = ServerProcess(folder("llama-bank"), "--http-port", str(http), "--grpc-port", str(grpc),
                               "--metrics-port", str(metrics), "--drain-timeout", "5", log_path=str(tmp_path / "log"))
        time.sleep(0.3)
    finally:
        stop.set()
        watcher.join()
        if server is not None:
            server.stop()
    ready = [codes for codes in seen if codes[0] == 200]
    assert ready, "the server never reported ready"
    assert all(codes == [200, 200, 200] for codes in ready), [c for c in ready if c != [200, 200, 200]][:3]
