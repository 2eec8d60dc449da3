"""Iteration-level batching behind Triton: the runtime's `Engine` under the generate models.

With `--batching continuous` (the default for decoder exports) one engine owns the running batch:
a request joins it at the next step boundary and leaves it the step it ends, each row with its own
adapter (bank) or its adapter's group (swappable, foldswap). Two Triton models feed it:

- `generate_stream`, a decoupled model (HTTP `POST /v2/models/generate_stream/generate_stream`
  as Server-Sent Events, or a gRPC stream): one response per group of new tokens as the engine
  chooses them (tokens that pile up while a response is being sent go together in the next one:
  each response costs ~2.7 ms of server CPU: scripts/bench_response_cost.py), the last one with `finish_reason`;
- `generate`, the non-streaming model: its Triton batch is handed to the engine, where it joins
  whatever is running, and answered when its rows end.

pytriton runs an async infer function as a task on one event loop per model instance; the engine's
thread puts each token in the stream's `Inbox`, which wakes the loop (through its `Relay`: at most one
`call_soon_threadsafe` per engine step) only when the stream waits for tokens or its request ends, so
a stream pacing its responses costs its loop no wake per step. pytriton 0.7.0
does not tell a model that a client went away, though Triton marks the request cancelled (a reset
HTTP stream, a cancelled gRPC stream or call): the server mends pytriton's stub to look at each
response, or every 0.1 s of a non-streaming batch, and report it (`Disconnects`), so a
`generate_stream` whose client left is cancelled within a step or two, a gRPC `generate` within 0.1 s.
Every request still has a deadline (`--request-timeout`) and a cap on its tokens (Triton does not
mark a closed non-streaming HTTP connection), and the OpenAI-compatible front cancels by the
request's id (`Streams.cancel`) when its own client leaves.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import socket
import threading
import time

import numpy as np

from ..errors import IA3Error
from ..runtime.engine import Request, Result
from ..runtime.generation import TextStream
from ..runtime.requests import NUMERIC_FIELDS, register
from .metrics import RequestTimes
from .models import BYTES, LOGPROBS, PROMPT_LOGPROBS, REQUEST_ID, Generate, Port, Row, Served, request_parameters

STREAM_OUTPUTS = (Port("text", BYTES), Port("output_ids", np.int64, (-1,)), Port("finish_reason", BYTES),
                  Port("prompt_tokens", np.int64), Port("error", BYTES), Port("logprobs", BYTES),
                  Port("prompt_logprobs", BYTES))
RESPONSE_COST_S = 2.7e-3  # server CPU per streamed response (pytriton's decoupled path; bench_response_cost.py)
STREAM_SHARE = 0.1  # of one core, what the responses of all open streams may cost together (docs/serving.md)
STUB_KEY = "ia3_stub_request"  # the parameter pytriton's mended stub adds: the key it reports a disconnect with


class Relay:
    """Engine wakes to one event loop: callbacks queued on the engine's thread during a step run on the
    loop after it (`Engine.after_step`), all in one wake, so the loop's thread takes the GIL from the
    engine's at most once a step."""

    def __init__(self, loop, engine):
        self.loop, self._pending, self._lock = loop, [], threading.Lock()
        engine.after_step.append(self.flush)

    def put(self, callback) -> None:
        """On the engine's thread: `callback()` will run on the loop, after those queued before it."""
        with self._lock:
            self._pending.append(callback)

    def flush(self) -> None:
        """On the engine's thread, after a step: one wake of the loop for what the step queued."""
        with self._lock:
            pending, self._pending = self._pending, []
        if pending:
            with contextlib.suppress(RuntimeError):  # the loop has closed (the server stops): no one to tell
                self.loop.call_soon_threadsafe(self._deliver, pending)

    @staticmethod
    def _deliver(pending: list) -> None:
        for callback in pending:
            callback()


class Inbox:
    """One stream's tokens and Result as the engine chooses them. The engine's thread appends, and wakes
    the stream's loop (through the Relay) only when the stream waits for them or the request ends: a
    stream that paces its responses lets its tokens gather without costing its loop a wake per step."""

    def __init__(self, relay: Relay):
        self.relay, self.wake = relay, asyncio.Event()
        self._tokens: list[int] = []
        self.result: Result | None = None
        self._waiting, self._lock = False, threading.Lock()

    def put(self, event) -> None:
        """On the engine's thread: a token (an int) or the Result."""
        with self._lock:
            if isinstance(event, Result):
                self.result, wake = event, True
            else:
                self._tokens.append(event)
                wake = self._waiting
            if wake:  # the stream will take what is here: the next token waits for its next take
                self._waiting = False
        if wake:
            self.relay.put(self.wake.set)

    async def take(self) -> tuple[list[int], Result | None]:
        """On the loop: the tokens chosen since the last take and the Result once there, waiting for
        at least one of them."""
        while True:
            with self._lock:
                tokens, self._tokens = self._tokens, []
                self._waiting = not tokens and self.result is None
            self.wake.clear()  # set for what was just taken, if at all: a wake for what comes next runs later
            if not self._waiting:
                return tokens, self.result
            await self.wake.wait()


class Streams:
    """The engine's requests by client id, so that a front that sees a disconnect can cancel one."""

    def __init__(self, engine, timeout_s: float | None):
        self.engine, self.timeout_s = engine, timeout_s
        self._running: dict[str, object] = {}
        self._lock = threading.Lock()
        self.finished: collections.Counter = collections.Counter()  # finish reason -> requests
        self.times = RequestTimes()  # latencies and tokens of the requests that ended (GET /metrics)
        self.most_active = 0  # the most requests seen decoding together

    def submit(self, row: Row, ids: tuple = (), on_event=None):
        submitted, first_token = time.monotonic(), None

        def event(e):  # on the engine's thread: count, then hand on
            nonlocal first_token
            if isinstance(e, Result):
                self.finished[e.finish_reason] += 1
                self.times.observe(e, submitted, first_token)
            else:
                first_token = first_token or time.monotonic()
                self.most_active = max(self.most_active, self.engine.active)
            if on_event is not None:
                on_event(e)

        handle = self.engine.submit(Request(row.ids, row.adapter, row.options, self.timeout_s, row.logprobs,
                                            row.prompt_logprobs), event)
        with self._lock:
            self._running.update((key, handle) for key in ids if key)
        return handle

    def done(self, ids: tuple) -> None:
        with self._lock:
            for key in ids:
                self._running.pop(key, None)

    def stats(self) -> dict:
        return {"active": self.engine.active, "queued": self.engine.queued, "largest_batch": self.most_active,
                "finished": dict(self.finished)}

    def cancel(self, request_id: str) -> bool:
        """Stop the request sent with this id (its row leaves at the next step); False if none runs."""
        with self._lock:
            handle = self._running.pop(request_id, None)
        if handle is not None:
            handle.cancel()
        return handle is not None


def parse_stream_request(parser: Generate, row: Row, request) -> str | None:
    """A generate_stream request's prompt, adapter and options (`parser` reads the stop strings), and
    its `logprobs` and `prompt_logprobs` parameters: how many alternatives' log-probabilities the
    responses report per new token, and per prompt token (the engine's submit checks them, as for every
    caller); returns the client's request id, if it sent one."""
    parser.parse(row, request)
    parameters = request_parameters(request)
    row.logprobs, row.prompt_logprobs = parameters.get(LOGPROBS), parameters.get(PROMPT_LOGPROBS)
    request_id = parameters.get(REQUEST_ID)
    return str(request_id) if request_id else None


class EngineGenerate(Generate):
    """`generate` on the engine: the Triton batch's rows join the running batch; answered when they end.
    A row whose client went away (a gRPC call cancelled or past its deadline) is cancelled (`Disconnects`)."""

    def __init__(self, served, streams: Streams):
        super().__init__(served)
        self.streams = streams

    def parse(self, row: Row, request) -> None:
        super().parse(row, request)
        row.key = request_parameters(request).get(STUB_KEY)

    def plan(self, rows: list[Row]) -> list[list[Row]]:
        return [rows] if rows else []  # the engine batches, with whatever else is running

    def execute(self, rows: list[Row]) -> list[list[int]]:
        handles, keys = [], tuple(row.key for row in rows)
        try:
            for row in rows:
                handles.append(self.streams.submit(row, (row.key,)))
            results = [handle.result() for handle in handles]
        except IA3Error:  # busy: the rows already in would run again, alone, when the batch is retried row by row
            for handle in handles:
                handle.cancel()
            raise
        finally:
            self.streams.done(keys)
        failed = [r for r in results if r.finish_reason in ("error", "deadline")]
        if failed:
            raise IA3Error(_failure(failed[0]))
        return [r.tokens for r in results]


class GenerateStream:
    """`generate_stream`: a decoupled model; one request, a response per group of new tokens."""

    name = "generate_stream"
    outputs = STREAM_OUTPUTS

    def __init__(self, served, streams: Streams):
        self.served, self.streams = served, streams
        self.parser = Generate(served, streamed=True)
        self.inputs = self.parser.inputs
        self.open = 0  # streams open now (all on this instance's one event loop)
        self.relays: dict = {}  # event loop -> its Relay

    def pause_s(self) -> float:
        """How long a stream waits after a response before the next: every response costs the server
        ~RESPONSE_COST_S of CPU, so with many streams open each sends fewer, larger responses, and all
        of them together stay within STREAM_SHARE of a core (one stream: every ~27 ms; 40: every ~1.1 s).
        The first token and the end are sent at once."""
        return RESPONSE_COST_S * self.open / STREAM_SHARE

    async def __call__(self, requests):
        request = requests[0]  # decoupled models take one request at a time (batching off)
        row = Row()
        try:
            missing = [p.name for p in self.inputs if not p.optional and p.name not in request]
            if missing:
                raise IA3Error(f"missing input `{missing[0]}`; every request sends "
                               f"{', '.join(p.name for p in self.inputs if not p.optional)}")
            ids = (parse_stream_request(self.parser, row, request), request_parameters(request).get(STUB_KEY))
            self.served.pool.acquire(row.adapter)
        except IA3Error as e:
            yield [_response(error=_one_line(e))]
            return
        loop = asyncio.get_running_loop()
        tokenizer = self.served.tokenizer
        text = TextStream(tokenizer.decode) if tokenizer is not None else None
        handle, sent = None, 0
        self.open += 1
        try:
            relay = self.relays.get(loop) or self.relays.setdefault(loop, Relay(loop, self.streams.engine))
            inbox = Inbox(relay)
            handle = self.streams.submit(row, ids, inbox.put)
            while True:
                tokens, result = await inbox.take()  # what arrived since the last response goes together
                # one decode per response, not per token: decode is a call to the tokenizer's child process
                piece = "" if text is None else text.finish(*tokens) if result else text.push(*tokens)
                logprobs = handle.logprobs[sent:sent + len(tokens)] if row.logprobs is not None else None
                scored = _scored(row.ids, handle.prompt_logprobs) if not sent else None  # with the first response
                sent += len(tokens)
                if result is None:
                    yield [_response(piece, tokens, logprobs=logprobs, prompt_logprobs=scored)]
                    with contextlib.suppress(asyncio.TimeoutError):  # tokens gather meanwhile; the end cuts it short
                        await asyncio.wait_for(inbox.wake.wait(), self.pause_s())
                    continue
                error = _failure(result) if result.finish_reason in ("error", "deadline") else ""
                yield [_response(piece, tokens, result.finish_reason, len(row.ids), error, logprobs, scored)]
                return
        except IA3Error as e:  # refused by the engine (busy, too long for its KV budget, ...)
            yield [_response(error=_one_line(e))]
        finally:
            self.open -= 1
            if handle is not None and not handle.done:
                handle.cancel()  # the stream ended early (the task was cancelled)
            self.streams.done(ids)
            self.served.pool.release(row.adapter)


class Disconnects(threading.Thread):
    """Cancels the `generate_stream` requests whose client went away: pytriton's stub, mended by the
    server (server.py), sends their key to this Unix datagram socket when Triton marks them cancelled."""

    def __init__(self, path: str, streams: Streams):
        super().__init__(name="ia3-disconnects", daemon=True)
        self.path, self.streams = path, streams
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(path)
        self._socket.settimeout(0.5)  # to see close(): tritonserver's stop removes the socket's folder first
        self._closing = threading.Event()
        self.cancelled = 0
        self.start()

    def run(self) -> None:
        while not self._closing.is_set():
            try:
                key = self._socket.recv(256)
            except TimeoutError:
                continue
            self.cancelled += self.streams.cancel(key.decode("utf-8", "replace"))  # False: it had ended already

    def close(self) -> None:
        self._closing.set()
        self.join(5)
        self._socket.close()


@register("serve generate_stream", ("causal-lm",), NUMERIC_FIELDS)
def open_stream_path(folder: str, limits):
    """`generate_stream` as a request path (runtime/requests.py): requests in Triton's form through the
    model's infer function, on an engine of its own; `send` gathers the streamed text."""
    from ..runtime import IA3Session
    from ..runtime.engine import Engine

    served = Served(IA3Session(folder, limits=limits))
    served.streams = Streams(Engine(served.session).start(), timeout_s=None)
    model = GenerateStream(served, served.streams)
    ports = {p.name: p for p in model.inputs}

    async def gather(request) -> str:
        pieces = []
        async for (response,) in model([request]):
            error = response["error"][0].decode()
            if error:
                raise IA3Error(error)
            pieces.append(response["text"][0].decode())
        return "".join(pieces)

    def send(text: str | bytes, **fields) -> str:
        request = {"text": np.array([text.encode() if isinstance(text, str) else text], dtype=object),
                   "adapter": np.array([b""], dtype=object)}
        request.update({k: np.array([v], dtype=ports[k].dtype) for k, v in fields.items()})
        return asyncio.run(gather(request))

    def close() -> None:
        served.streams.engine.close(cancel=True)
        served.session.close()

    send.close = close
    return send


def _failure(result: Result) -> str:
    if result.finish_reason == "deadline":
        return (f"the request passed its deadline (--request-timeout) after {len(result.tokens)} new tokens; "
                "ask for fewer tokens or raise the timeout")
    return result.error or "generation failed"


def _response(text: str = "", tokens=(), finish_reason: str = "", prompt_tokens: int = 0, error: str = "",
              logprobs: list | None = None, prompt_logprobs: list | None = None) -> dict:
    """One streamed response (no batch dimension: the model does not batch). `output_ids` is left out
    when a response carries no token (pytriton cannot send an empty array); `logprobs`, where asked, is
    JSON: per token of `output_ids`, [its log-probability, [[id, log-probability], ...]]; `prompt_logprobs`
    (the first response) per prompt token, [its id, its log-probability, [[id, log-probability], ...]]
    (null and null for the first token, which nothing predicts)."""
    response = {"text": _one(text), "finish_reason": _one(finish_reason), "error": _one(error),
                "prompt_tokens": np.array([prompt_tokens], np.int64)}
    if len(tokens):
        response["output_ids"] = np.array(tokens, np.int64)
        if logprobs is not None:
            response["logprobs"] = _one(json.dumps(logprobs))
    if prompt_logprobs is not None:
        response["prompt_logprobs"] = _one(json.dumps(prompt_logprobs))
    return response


def _scored(prompt: list[int], entries: list | None) -> list | None:
    """The prompt's [id, log-probability, alternatives] entries (None and None for its first token)."""
    return None if entries is None else [[t, *(entry or (None, None))] for t, entry in zip(prompt, entries)]


def _one(text: str) -> np.ndarray:
    return np.array([text.encode("utf-8")], dtype=object)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
