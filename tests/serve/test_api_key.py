"""`serve --api-key` (here from IA3_API_KEY, as a container passes a secret): without the key a client gets
health and metrics only, on every port (OpenAI, Triton HTTP, Triton gRPC), so a server on 0.0.0.0 no
longer lets any network client run, load or unload adapters; with it, every answer still equals the
same request run alone."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import folder
from test_generate import A1, A2

from ia3_export.serve import ServeClient, ServeError
from ia3_export.serve.process import free_ports

KEY = secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def guarded(start_server):
    port = free_ports(1)[0]
    server = start_server(folder("llama-bank"), "--openai-port", str(port), env={"IA3_API_KEY": KEY})
    server.openai = f"http://127.0.0.1:{port}/v1"
    return server


def status_of(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_with_the_key_every_port_answers_as_alone(guarded, reference):
    import openai
    ref = reference("llama-bank")
    expected = ref.generate([5, 6, 7], A1, 10)
    client = openai.OpenAI(base_url=guarded.openai, api_key=KEY)
    assert [m.id for m in client.models.list()] == ["llama-bank", A1, A2]
    done = client.completions.create(model=A1, prompt=[5, 6, 7], max_tokens=10)
    assert done.choices[0].text == ref.decode(expected)
    streamed = client.completions.create(model=A1, prompt=[5, 6, 7], max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == ref.decode(expected)
    with ServeClient(guarded.url, api_key=KEY) as triton:
        assert triton.generate(input_ids=[5, 6, 7], adapter=A1, max_new_tokens=10).outputs["output_ids"] == expected
        assert sum((e.get("output_ids") or [] for e in triton.stream(input_ids=[5, 6, 7], adapter=A1,
                                                                      max_new_tokens=10)), []) == expected
        assert triton.adapters("list")["adapters"] == [A1, A2]


@pytest.mark.parametrize("key", [None, KEY[:-1], KEY + "x", ""], ids=["none", "a prefix", "longer", "empty"])
def test_without_the_key_the_openai_api_answers_401(guarded, key):
    import openai
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    for path, body in [("models", None), ("completions", {"model": A1, "prompt": [5], "max_tokens": 2}),
                       ("load_lora_adapter", {"lora_name": "x", "lora_path": folder("llama-a3")}),
                       ("unload_lora_adapter", {"lora_name": A1})]:
        status, text = status_of(f"{guarded.openai}/{path}", body, headers)
        assert status == 401 and "send the server's key as `Authorization: Bearer KEY`" in text, (path, text)
        assert KEY not in text
    status, text = status_of(f"{guarded.openai[:-3]}/tokenize", {"prompt": "hi"}, headers)
    assert status == 401, text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.openai, api_key=key or "wrong").completions.create(
            model=A1, prompt=[5], max_tokens=2)
    with ServeClient(guarded.url, api_key=KEY) as triton:  # nothing was unloaded or loaded
        assert triton.adapters("list")["adapters"] == [A1, A2]


def test_without_the_key_triton_serves_health_only(guarded, reference):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    base = guarded.url
    assert status_of(f"{base}/v2/health/ready")[0] == 200  # what a Kubernetes probe sends: no key
    assert status_of(f"{guarded.openai[:-3]}/health")[0] == 200
    assert status_of(f"http://127.0.0.1:{guarded.metrics_port}/metrics")[0] == 200
    for path, body in [("/v2", None), ("/v2/models/generate", None),
                       ("/v2/models/generate_stream/generate_stream", {"input_ids": [5], "max_new_tokens": 2}),
                       ("/v2/models/adapters/infer", {"inputs": []}), ("/v2/repository/index", {})]:
        for headers in ({}, {"triton-access-token": KEY[:-1]}):
            status, text = status_of(base + path, body, headers)
            assert status in (401, 403), (path, status, text)
    with pytest.raises(ServeError), ServeClient(base) as anyone:
        anyone.generate(input_ids=[5, 6, 7], adapter=A1, max_new_tokens=2)
    with pytest.raises(ServeError), ServeClient(base, api_key="wrong") as wrong:
        wrong.adapters("unload", A1)
    inputs = [grpcclient.InferInput("input_ids", [1, 3], "INT64"), grpcclient.InferInput("adapter", [1, 1], "BYTES"),
              grpcclient.InferInput("max_new_tokens", [1, 1], "INT32")]
    for tensor, value in zip(inputs, ([[5, 6, 7]], [[A1.encode()]], [[4]])):
        tensor.set_data_from_numpy(np.array(value, {"INT64": np.int64, "BYTES": np.object_, "INT32": np.int32}[
            tensor.datatype()]))
    with grpcclient.InferenceServerClient(f"127.0.0.1:{guarded.grpc}") as client:
        assert client.is_server_ready()
        with pytest.raises(Exception, match="(?i)restricted|unavailable|permission|denied|access"):
            client.infer("generate", inputs)
        answer = client.infer("generate", inputs, headers={"triton-grpc-protocol-triton-access-token": KEY})
    assert answer.as_numpy("error")[0, 0] == b""
    assert answer.as_numpy("output_ids")[0].tolist() == reference("llama-bank").generate([5, 6, 7], A1, 4)


def test_the_key_stays_out_of_the_log_and_bad_keys_are_refused(guarded, tmp_path):
    assert KEY not in guarded.log
    exe = [os.path.join(os.path.dirname(sys.executable), "ia3-export"), "serve", folder("llama-bank")]
    for env, option, message in [({"IA3_API_KEY": ""}, [], "IA3_API_KEY is set but empty"),
                                 ({}, ["--api-key", "has space"], "--api-key must be 1 to 256 characters")]:
        done = subprocess.run(exe + option, capture_output=True, text=True, timeout=120,
                              env={**os.environ, **env})
        assert done.returncode != 0 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and "has space" not in done.stderr
