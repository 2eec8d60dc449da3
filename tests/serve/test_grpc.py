"""`generate_stream` over a gRPC stream (tritonclient.grpc, as docs/serving.md shows): the tokens equal
the same request run alone and arrive in several responses; a cancelled stream leaves the engine."""
from __future__ import annotations

import queue
import time

import numpy as np
import pytest
from conftest import folder
from prepare import LONG

from ia3_export.serve import ServeClient


@pytest.fixture(scope="module")
def wide(start_server):
    return start_server(folder("llama-wide-bank"), "--drain-timeout", "5")  # steps of milliseconds: tokens trickle


def stream(server, max_new_tokens: int):
    """(client, queue of (result, error)) with one generate_stream request sent on a started stream."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    inputs = [grpcclient.InferInput("input_ids", [3], "INT64"), grpcclient.InferInput("adapter", [1], "BYTES"),
              grpcclient.InferInput("max_new_tokens", [1], "INT32")]
    for tensor, value in zip(inputs, (np.array([5, 6, 7], np.int64), np.array([b"wide-a1"], np.object_),
                                      np.array([max_new_tokens], np.int32))):
        tensor.set_data_from_numpy(value)
    client, responses = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}"), queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("generate_stream", inputs)
    return client, responses


def test_grpc_stream_equals_alone(wide, reference):
    client, responses = stream(wide, 30)
    tokens, count, reason = [], 0, ""
    try:
        while not reason:
            result, error = responses.get(timeout=60)
            assert error is None, error
            assert result.as_numpy("error")[0] == b""
            ids = result.as_numpy("output_ids")
            tokens += [] if ids is None else ids.tolist()
            reason, count = result.as_numpy("finish_reason")[0].decode(), count + 1
        client.stop_stream()
    finally:
        client.close()
    assert tokens == reference("llama-wide-bank").generate([5, 6, 7], "wide-a1", 30)
    assert reason == "length" and count > 1


def test_a_cancelled_grpc_stream_leaves_the_engine(wide):
    admin = ServeClient(wide.url)
    before = admin.adapters("stats")["engine"]["finished"].get("cancelled", 0)
    client, responses = stream(wide, LONG)
    try:
        responses.get(timeout=60)  # decoding
        client.stop_stream(cancel_requests=True)
    finally:
        client.close()
    deadline = time.monotonic() + 60
    while admin.adapters("stats")["engine"]["active"]:
        assert time.monotonic() < deadline, "the cancelled stream never ended"
        time.sleep(0.1)
    assert admin.adapters("stats")["engine"]["finished"].get("cancelled", 0) == before + 1
