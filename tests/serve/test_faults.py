"""Bad requests get a clear error of their own and the server keeps serving the rest; adapters come
and go while requests run, none of them dropped."""
from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time

import pytest
from conftest import concurrently, folder
from test_generate import A1, A2, ask

from ia3_export.serve import ServeClient, ServeError


def test_bad_requests_fail_alone_in_a_shared_batch(llama_bank, reference):
    ref = reference("llama-bank")
    good = {"input_ids": [5, 6, 7], "max_new_tokens": 4}
    requests = [
        {**good, "adapter": A1},
        {**good, "adapter": "nope"},  # unknown adapter
        {**good, "adapter": A2, "max_new_tokens": 126},  # 3 + 126 tokens: over the model's 128
        {**good, "adapter": A2, "input_ids": [5, 999, 7]},  # outside the vocabulary
        {**good, "adapter": None},
        {**good, "adapter": A2, "input_ids": [-1, -1]},  # only padding: an empty prompt
        {**good, "adapter": "../../etc"},  # a path is never an adapter name
        {**good, "adapter": A2},
    ]
    answers = concurrently([lambda r=r: ask(llama_bank.url, **r) for r in requests])
    errors = {i: str(a) for i, a in enumerate(answers) if isinstance(a, Exception)}
    assert sorted(errors) == [1, 2, 3, 5, 6]
    assert "adapter 'nope' is not loaded (loaded: llama-a1, llama-a2)" in errors[1]
    assert "the prompt has 3 tokens and 126 new tokens were asked, over this model's limit of 128" in errors[2]
    assert "input_ids holds 999, outside the vocabulary of 320 tokens" in errors[3]
    assert "the prompt is empty" in errors[5]
    assert "adapter '../../etc' is not loaded" in errors[6]
    for i in (0, 4, 7):
        r = requests[i]
        assert answers[i].outputs["output_ids"] == ref.generate(r["input_ids"], r["adapter"], r["max_new_tokens"])
        assert answers[i].batch_size == 3  # the good rows still ran as one batch


def post(server, body: bytes, model: str = "generate") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http, timeout=30)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def tensor(name, datatype, data):
    return {"name": name, "datatype": datatype, "shape": [1, len(data)], "data": data}


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 500, "failed to parse the request JSON buffer"),  # Triton answers 500 to this one
    (json.dumps({"inputs": [tensor("text", "BYTES", ["hi"]), tensor("max_new_tokens", "INT32", [4])]}).encode(),
     200, "missing input `adapter`"),
    (json.dumps({"inputs": [tensor("text", "BYTES", ["hi"]), tensor("adapter", "BYTES", [""]),
                            tensor("max_new_tokens", "FP32", [4.0])]}).encode(), 400, "data-type is 'FP32', but model 'generate' expects 'INT32'"),
    (json.dumps({"inputs": [tensor("text", "BYTES", ["hi"]), tensor("adapter", "BYTES", [""]),
                            tensor("max_new_tokens", "INT32", [4]), tensor("input_ids", "INT64", [5])]}).encode(),
     200, "give exactly one of the inputs `text` and `input_ids`"),
    (json.dumps({"inputs": [tensor("text", "BYTES", ["hi"]), tensor("adapter", "BYTES", [""]),
                            tensor("max_new_tokens", "INT32", [0])]}).encode(), 200, "max_new_tokens must be an integer of at least 1"),  # the runtime's own check
    (json.dumps({"inputs": [tensor("text", "BYTES", ["hi"]), tensor("adapter", "BYTES", [""]),
                            tensor("max_new_tokens", "INT32", [4])], "parameters": {"note": "@@"}}).encode().replace(
        b"@@", b"\xff\xfe"), 200, "the request's parameters cannot be read (UnicodeDecodeError"),  # was a traceback
])
def test_malformed_request_gets_a_clear_error_and_the_server_serves_on(llama_bank, reference, body, status, message):
    got_status, reply = post(llama_bank, body)
    assert got_status == status, reply
    error = reply["error"] if status != 200 else next(o["data"][0] for o in reply["outputs"] if o["name"] == "error")
    assert message in error
    answer = ask(llama_bank.url, input_ids=[5, 6], adapter=A1, max_new_tokens=3)
    assert answer.outputs["output_ids"] == reference("llama-bank").generate([5, 6], A1, 3)


def test_millions_of_input_ids_are_refused_without_growing_the_server(llama_bank):
    """10 million ids (300: above CPython's cached small ints) over Triton's HTTP port: the length limit is
    checked on the array (it once built a Python list of every id first, ~360 MB for these). What grows is
    pytriton's own copy of the tensor (80 MB here)."""
    def peak_mb() -> float:  # the process's peak resident memory: what a list built and freed still shows
        with open(f"/proc/{llama_bank.process.pid}/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) / 1024

    n, before = 10_000_000, peak_mb()
    ids = b'{"name": "input_ids", "datatype": "INT64", "shape": [1, %d], "data": [' % n + b"300," * (n - 1) + b"300]}"
    others = [json.dumps(tensor("adapter", "BYTES", [A1])), json.dumps(tensor("max_new_tokens", "INT32", [3]))]
    body = b'{"inputs": [%s, %s, %s]}' % (ids, *(o.encode() for o in others))
    status, reply = post(llama_bank, body)
    error = next(o["data"][0] for o in reply["outputs"] if o["name"] == "error")
    assert status == 200 and "the prompt has 10000000 tokens and 3 new tokens were asked" in error
    assert peak_mb() - before < 200, (before, peak_mb())


def test_client_disconnecting_mid_generation(llama_bank, reference):
    stats = ServeClient(llama_bank.url).adapters("stats")["generate"]
    body = json.dumps({"inputs": [tensor("input_ids", "INT64", [5, 6, 7]), tensor("adapter", "BYTES", [A1]),
                                  tensor("max_new_tokens", "INT32", [120])]}).encode()
    with socket.create_connection(("127.0.0.1", llama_bank.http)) as s:
        s.sendall(b"POST /v2/models/generate/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    answer = ask(llama_bank.url, input_ids=[9, 8, 7], adapter=A2, max_new_tokens=5)
    assert answer.outputs["output_ids"] == reference("llama-bank").generate([9, 8, 7], A2, 5)
    deadline = time.monotonic() + 30
    while ServeClient(llama_bank.url).adapters("stats")["generate"]["requests"] < stats["requests"] + 2:
        assert time.monotonic() < deadline, "the abandoned request never ran"
        time.sleep(0.2)
    answer = ask(llama_bank.url, input_ids=[9, 8, 7], adapter=A1, max_new_tokens=5)  # still serving after it ran
    assert answer.outputs["output_ids"] == reference("llama-bank").generate([9, 8, 7], A1, 5)


def test_adapters_added_and_removed_while_serving(llama_bank, reference):
    """Clients keep asking for a1, a2 and the base model while a3 is added, used and removed in the
    middle of a running a3 request: that request finishes with a3, later ones get a clear error.
    Whether an unload lands while the request runs is timing, so it is tried until one does."""
    ref, admin = reference("llama-bank"), ServeClient(llama_bank.url)
    stop, failures, done = threading.Event(), [], []

    def steady(adapter):
        with ServeClient(llama_bank.url) as c:
            while not stop.is_set():
                answer = c.generate(input_ids=[5, 6, 7], adapter=adapter, max_new_tokens=8)
                if answer.outputs["output_ids"] != ref.generate([5, 6, 7], adapter, 8):
                    failures.append(adapter)
                done.append(adapter)

    threads = [threading.Thread(target=steady, args=(a,)) for a in (A1, A2, None)]
    for t in threads:
        t.start()
    try:
        ref.load(folder("llama-a3"))
        prompt, states = list(range(10, 26)), []
        while "draining" not in states:  # until an unload lands while a3 requests run (timing: a few tries)
            assert len(states) < 10, f"never caught the a3 request running: {states}"
            a3 = admin.adapters("load", source=folder("llama-a3"))["loaded"]
            assert a3 == "llama-a3" and admin.adapters("list")["adapters"] == [A1, A2, a3]
            running = concurrently_started(lambda: ask(llama_bank.url, input_ids=prompt, adapter=a3, max_new_tokens=110))
            deadline = time.monotonic() + 30
            while not admin.adapters("list")["in_use"].get(a3):
                assert time.monotonic() < deadline, "never saw an a3 request running"
            states.append(admin.adapters("unload", name=a3)[a3])
            assert a3 not in admin.adapters("list")["adapters"]  # no new request gets it...
            with pytest.raises(ServeError, match="adapter 'llama-a3' is not loaded"):
                admin.generate(input_ids=[7, 8], adapter=a3, max_new_tokens=2)
            # ...but the running one finishes with it (it drained), or had finished already (it was removed)
            assert running.result().outputs["output_ids"] == ref.generate(prompt, a3, 110)
        assert a3 not in admin.adapters("list")["in_use"]
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures, failures[:3]
    assert all(done.count(a) >= 2 for a in (A1, A2, None)), "the steady clients did not keep running"
    with pytest.raises(ServeError, match="adapter 'llama-a1' is already loaded; remove it first"):
        admin.adapters("load", source=folder("llama-a1"))
    admin.close()


class concurrently_started(threading.Thread):
    """A call running in its own thread; result() joins it and returns (or raises) what it did."""

    def __init__(self, call):
        super().__init__(daemon=True)
        self.call, self.value, self.error = call, None, None
        self.start()

    def run(self):
        try:
            self.value = self.call()
        except Exception as e:  # re-raised in result()
            self.error = e

    def result(self, timeout: float = 60):
        self.join(timeout)
        assert not self.is_alive(), "the call did not come back in time"
        if self.error is not None:
            raise self.error
        return self.value
