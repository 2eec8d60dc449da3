"""Faults of `serve --batching continuous`: shipped adapters named again at start-up, clients that
disconnect from a direct `generate_stream` or leave a gRPC `generate`, and many concurrent requests
against a short queue."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import struct
import time

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli
from conftest import concurrently, folder
from prepare import LONG
from test_generate import A1, A2

from ia3_export.serve import ServeClient
from ia3_export.serve.process import free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def serve_flood():
    """scripts/serve_flood.py (the 1,000-request run; this file runs it smaller)."""
    spec = importlib.util.spec_from_file_location("serve_flood", os.path.join(ROOT, "scripts", "serve_flood.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adapter_the_folder_ships_is_accepted_once(start_server, reference, tmp_path):
    """By its name, its shipped file or the PEFT folder it was exported from: loaded once, not exit 2."""
    shipped = f"{folder('llama-bank')}/adapters/{A1}.onnx_adapter"
    server = start_server(folder("llama-bank"), "--adapter", A1, "--adapter", shipped, "--adapter", folder(A1),
                          "--adapter", folder(A2) + "/")
    admin = ServeClient(server.url)
    assert admin.adapters("list")["adapters"] == [A1, A2]
    answer = admin.generate(input_ids=[5, 6, 7], adapter=A1, max_new_tokens=6)
    assert answer.outputs["output_ids"] == reference("llama-bank").generate([5, 6, 7], A1, 6)
    other = shutil.copytree(folder("llama-a3"), tmp_path / A1)  # the same name, other vectors
    http, grpc, metrics = free_ports(3)
    result = run_cli("serve", folder("llama-bank"), "--http-port", http, "--grpc-port", grpc, "--metrics-port", metrics,
                     "--adapter", str(other), timeout=120)
    assert_one_line_error(result, 2, f"adapter '{A1}' is already loaded from {shipped} with other vectors; rename one")


def test_a_direct_stream_whose_client_disconnects_is_cancelled(start_server):
    """Triton marks the stream cancelled when its client resets the connection; the server's mended
    pytriton stub reports it and the engine drops the row (without that, only --request-timeout would)."""
    server = start_server(folder("llama-wide-bank"), "--drain-timeout", "5")
    body = json.dumps({"input_ids": [5, 6, 7], "adapter": "wide-a1", "max_new_tokens": LONG}).encode()
    with socket.create_connection(("127.0.0.1", server.http)) as s:
        s.sendall(b"POST /v2/models/generate_stream/generate_stream HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        s.settimeout(60)
        seen = b""
        while b"data:" not in seen:  # the headers and the first event may come in separate reads
            chunk = s.recv(4096)
            assert chunk, f"the server closed the stream before its first tokens: {seen!r}"
            seen += chunk
        # the first tokens came: it is decoding
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    assert engine_finished(server) == {"cancelled": 1}  # not run to its LONG tokens


def test_a_grpc_generate_whose_call_ends_early_is_cancelled(start_server):
    """A non-streaming `generate` over gRPC whose call ends before its answer (tritonclient's client_timeout:
    the call is cancelled at its deadline) leaves the engine: Triton marks the request cancelled, and the
    mended stub, which polls its batch's requests while they run, reports it (without that the row would
    decode its LONG tokens, or until --request-timeout; Triton 2.51 marks no closed HTTP connection)."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    server = start_server(folder("llama-wide-bank"), "--drain-timeout", "5")
    inputs = [grpcclient.InferInput("input_ids", [1, 3], "INT64"), grpcclient.InferInput("adapter", [1, 1], "BYTES"),
              grpcclient.InferInput("max_new_tokens", [1, 1], "INT32")]
    for tensor, value in zip(inputs, (np.array([[5, 6, 7]], np.int64), np.array([[b"wide-a1"]], np.object_),
                                      np.array([[LONG]], np.int32))):
        tensor.set_data_from_numpy(value)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    with pytest.raises(InferenceServerException, match="Deadline"):
        client.infer("generate", inputs, client_timeout=1.0)
    assert engine_finished(server) == {"cancelled": 1}


def engine_finished(server, timeout_s: float = 60) -> dict:
    """The engine's requests by finish reason, once none is running (a test fails past timeout_s)."""
    admin, deadline = ServeClient(server.url), time.monotonic() + timeout_s
    while admin.adapters("stats")["engine"]["active"]:
        assert time.monotonic() < deadline, "the abandoned request never ended"
        time.sleep(0.1)
    return admin.adapters("stats")["engine"]["finished"]


def test_many_concurrent_requests_are_answered_or_refused_busy(start_server, reference):
    """200 requests at once (streamed and not, half through Triton's endpoints, half through the OpenAI API)
    against --max-queue 2 --max-batch 1: each answer equals the request alone or is refused `busy: ...`;
    the server's memory stays bounded, and once the flood is over a request is served again. (With room
    for 58, the engine drained most of the 200 while the client was still sending them: nobody was
    refused. Through the OpenAI API 1,000 at once used to wait in the app for Triton's connections,
    and 100 of them ended in a 500.)"""
    port = free_ports(1)[0]
    server = start_server(folder("llama-bank"), "--max-queue", "2", "--max-batch", "1", "--drain-timeout", "10",
                          "--openai-port", str(port))
    ref = reference("llama-bank")
    script = serve_flood()
    before = script.group_rss_kib(server.process.pid)
    report = script.flood(server.url, 1000, lambda ids, adapter, n: ref.generate(ids, adapter, n), watch=server.process.pid,
                          openai=f"http://127.0.0.1:{port}", decode=ref.decode)
    assert report["wrong"] == [] and report["other_errors"] == [], report
    assert report["correct"] + report["busy"] == 1000 and report["correct"] >= 3 and report["busy"] >= 1  # 3: row + queue
    assert report["rss_peak_kib"] < before + 300 * 1024, report  # bounded: far below what 200 requests could pile up
    import openai
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    # all three places free again: the stream takes the row, then the two others the queue (sent together
    # with the stream, the third could find the queue still holding the first: it is admitted at a step boundary)
    stream = iter(client.completions.create(model=A1, prompt=[5, 6, 0], max_tokens=6, stream=True))
    first = next(stream)
    again = concurrently([lambda i=i: client.completions.create(model=A1, prompt=[5, 6, i], max_tokens=6)
                          for i in (1, 2)])
    texts = ["".join(c.choices[0].text for c in [first, *stream]), *(a.choices[0].text for a in again)]
    assert texts == [ref.decode(ref.generate([5, 6, i], A1, 6)) for i in range(3)]


def test_the_openai_api_admits_what_the_engine_can_hold(start_server):
    """--max-batch 1 --max-queue 1: two streamed completions hold the engine's row and its queue place; a third
    is refused busy by the API itself, at once, and streams their clients leave give their places back."""
    import openai
    port = free_ports(1)[0]
    server = start_server(folder("llama-wide-bank"), "--max-batch", "1", "--max-queue", "1", "--openai-port",
                          str(port), "--drain-timeout", "5")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    held = [client.completions.create(model="wide-a1", prompt=[5, 6, 0], max_tokens=LONG, stream=True)]
    next(iter(held[0]))  # decoding: in the engine's one row (a second sent at once could find the queue taken)
    held.append(client.completions.create(model="wide-a1", prompt=[5, 6, 1], max_tokens=LONG, stream=True))
    admin, deadline = ServeClient(server.url), time.monotonic() + 30
    while admin.adapters("stats")["engine"]["queued"] != 1:  # the second waits in the queue
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(openai.APIStatusError, match="busy: 2 requests in flight, the limit is 2") as refused:
        client.completions.create(model="wide-a1", prompt=[5], max_tokens=2)
    assert refused.value.status_code == 503
    for stream in held:
        stream.close()
    deadline = time.monotonic() + 30
    while True:  # the server sees each client leave at its next token
        try:
            assert client.completions.create(model="wide-a1", prompt=[5], max_tokens=2).choices[0].finish_reason
            break
        except openai.APIStatusError as e:
            assert "busy" in str(e) and time.monotonic() < deadline, e
            time.sleep(0.1)
