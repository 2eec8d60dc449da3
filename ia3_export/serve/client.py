"""A small client for `ia3-export serve`: KServe v2 JSON over HTTP, standard library only.

Any Triton client works (tritonclient, pytriton's ModelClient, curl); this one adds what the
server expects for batching: token ids are padded with -1 to a bucket length (16, 32, 64, ...),
because Triton only batches requests whose tensors have the same shape. Each thread keeps its
own keep-alive connection.
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import threading
import urllib.parse

from ..errors import IA3Error

DATATYPES = {str: "BYTES", bool: "BOOL", int: "INT64", float: "FP32"}
INT32_INPUTS = ("max_new_tokens", "top_k", "min_new_tokens")
# the generate models' optional logits-processing inputs -> the type each is sent as (logit_bias: a JSON object)
PROCESSORS = {"top_k": int, "min_p": float, "repetition_penalty": float, "presence_penalty": float,
              "frequency_penalty": float, "min_new_tokens": int, "ignore_eos": bool, "logit_bias": json.dumps}


class ServeError(IA3Error):
    """The server answered this request with an error (the server itself keeps serving)."""


@dataclasses.dataclass
class Answer:
    outputs: dict
    batch_size: int  # rows in the ONNX Runtime batch that computed this answer


def bucket(length: int, smallest: int = 16) -> int:
    """The padded length for a prompt of `length` tokens: a power of two, at least `smallest`."""
    size = smallest
    while size < length:
        size *= 2
    return size


class ServeClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 120.0, api_key: str | None = None):
        """`api_key`: the server's --api-key, sent as Triton's `triton-access-token` header."""
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout = parsed.hostname, parsed.port or 80, timeout
        self.headers = access_headers(api_key)
        self._local = threading.local()

    # -- models --------------------------------------------------------------------------------
    def generate(self, text: str | None = None, input_ids: list[int] | None = None, adapter: str | None = None,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list[str] | None = None, **processors) -> Answer:
        """`processors`: any of PROCESSORS (top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty,
        min_new_tokens, ignore_eos, logit_bias as {token id: bias}), as GenerationOptions takes them."""
        inputs = {**_prompt(text, input_ids, adapter), "max_new_tokens": max_new_tokens, **processor_inputs(processors)}
        if do_sample:
            inputs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p),
                          seed=-1 if seed is None else seed)
        return self.infer("generate", inputs, {"stop": json.dumps(list(stop))} if stop else None)

    def stream(self, text: str | None = None, input_ids: list[int] | None = None, adapter: str | None = None,
               max_new_tokens: int = 32, stop: list[str] | None = None, request_id: str | None = None, **sampling):
        """The `generate_stream` model's responses as they arrive (Server-Sent Events over HTTP): dicts with
        `text` (the new piece), `output_ids` (the new tokens, absent when none), `finish_reason` (set on
        the last one) and `prompt_tokens`. An `error` in a response raises ServeError."""
        body = {**_prompt(text, None if input_ids is None else list(input_ids), adapter), "max_new_tokens": max_new_tokens,
                **sampling, **processor_inputs({k: sampling[k] for k in PROCESSORS if k in sampling})}
        if input_ids is not None:
            body["input_ids"] = list(input_ids)  # one request, not batched: no bucketing
        if stop:
            body["stop"] = json.dumps(list(stop))
        if request_id:
            body["request_id"] = request_id
        for event in server_sent_events(self.host, self.port, "/v2/models/generate_stream/generate_stream", body,
                                        self.timeout, self.headers):
            if event.get("error"):
                raise ServeError(f"generate_stream: {event['error']}")
            ids = event.get("output_ids")
            if ids is not None:
                event["output_ids"] = ids if isinstance(ids, list) else [ids]
            yield event
            if event.get("finish_reason"):
                return

    def classify(self, text: str | None = None, input_ids: list[int] | None = None, adapter: str | None = None) -> Answer:
        return self.infer("classify", _prompt(text, input_ids, adapter))

    def adapters(self, action: str, name: str | None = None, source: str | None = None) -> dict:
        inputs = {"action": action, **({"name": name} if name else {}), **({"source": source} if source else {})}
        return json.loads(self.infer("adapters", inputs).outputs["result"])

    # -- protocol ------------------------------------------------------------------------------
    def infer(self, model: str, inputs: dict, parameters: dict | None = None) -> Answer:
        """One request; each value is a str, bool, int, float or a list of ints (a token id row);
        `parameters`: the request's (such as `stop`)."""
        body = {"inputs": [_tensor(name, value) for name, value in inputs.items()]}
        if parameters:
            body["parameters"] = parameters
        status, answer = self.request("POST", f"/v2/models/{model}/infer", json.dumps(body).encode())
        reply = json.loads(answer or b"{}")
        if status != 200:
            raise ServeError(f"{model}: HTTP {status}: {reply.get('error', answer[:300])}")
        outputs = {o["name"]: _value(o) for o in reply["outputs"]}
        if outputs.get("error"):
            raise ServeError(f"{model}: {outputs['error']}")
        return Answer(outputs, int(outputs.get("batch_size", 0) or 0))

    def ready(self) -> bool:
        try:
            return self.request("GET", "/v2/health/ready")[0] == 200
        except OSError:
            return False

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):  # a kept-alive connection the server closed is reopened once
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                conn.request(method, path, body=body,
                             headers={**self.headers, **({"Content-Type": "application/json"} if body else {})})
                response = conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close this thread's connection (an open keep-alive connection holds a draining server up)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def __enter__(self) -> "ServeClient":
        return self

    def __exit__(self, *_) -> None:
        self.close()


def access_headers(api_key: str | None) -> dict[str, str]:
    """The HTTP header Triton's restricted APIs check (pytriton's name; on gRPC the metadata key is
    `triton-grpc-protocol-triton-access-token`)."""
    return {"triton-access-token": api_key} if api_key else {}


def server_sent_events(host: str, port: int, path: str, body: dict, timeout: float, headers: dict | None = None):
    """POST `body` as JSON to a streaming endpoint; yield each Server-Sent Event's data, parsed (the
    OpenAI API's closing `[DONE]` left out). A status other than 200 raises ServeError."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={**(headers or {}), "Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise ServeError(f"{path}: HTTP {response.status}: {response.read()[:300]!r}")
        for line in response:
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                yield json.loads(line[5:])
    finally:
        conn.close()


def processor_inputs(given: dict) -> dict:
    """The inputs for the logits-processing options given (None left out), each in its input's type."""
    unknown = sorted(set(given) - set(PROCESSORS))
    if unknown:
        raise IA3Error(f"unknown generate option {unknown[0]!r}; the client takes {', '.join(PROCESSORS)}")
    return {name: PROCESSORS[name](value) for name, value in given.items() if value is not None}


def _prompt(text, input_ids, adapter) -> dict:
    if (text is None) == (input_ids is None):
        raise IA3Error("give exactly one of text and input_ids")
    prompt = {"text": text} if text is not None else {"input_ids": list(input_ids) + [-1] * (bucket(len(input_ids)) - len(input_ids))}
    return {**prompt, "adapter": adapter or ""}


def _tensor(name: str, value) -> dict:
    if isinstance(value, list):
        return {"name": name, "datatype": "INT64", "shape": [1, len(value)], "data": value}
    datatype = "INT32" if name in INT32_INPUTS else DATATYPES[type(value)]
    return {"name": name, "datatype": datatype, "shape": [1, 1], "data": [value]}


def _value(output: dict):
    """A [1, ...] output: a scalar for shape [1, 1] BYTES/INT outputs, else the flat list."""
    data = output.get("data", [])
    if output["datatype"] == "BYTES" or output["name"] == "batch_size":
        return data[0] if data else ""
    return data
