"""The OpenAI-compatible API in front of Triton: `/v1/completions`, `/v1/chat/completions` (streamed
as Server-Sent Events or not, with usage on request) and `/v1/models` (and one by its id), with
`"model"` naming the adapter as vLLM and LoRAX do (the base model's id, or "", for no adapter), and
vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` adding and removing IA3 adapters, and
vLLM's `/health`, `/metrics` (Prometheus: serve/metrics.py), `/tokenize` and `/detokenize` on the
same port.

A thin Starlette app (served by uvicorn in the server's process) that calls Triton's own
`generate_stream` endpoint over loopback HTTP (httpx), so every request still passes Triton (its
metrics, its health, its queue), and a non-streamed completion is the stream gathered. It adds what
Triton cannot see: a client that disconnects is cancelled in the engine by the request's id; a chat's
messages become the prompt through the tokenizer's chat template (`runtime.chat`); a request with
several prompts, or `n` choices, is one Triton stream per choice, merged into one answer; log-probabilities
come back in OpenAI's shapes. What a body may ask and the shapes of the answers are `openai_schema`'s.
Two guards wrap every route: `RequireKey` (with --api-key) and `Admission` (at most --max-batch +
--max-queue POSTs at once). Errors use OpenAI's body (`{"error": {"message", "type", "code"}}`) with
400 for a bad request, 401 without the key, 404 for an unknown model, 408 for a body that does not
arrive in time, 413 for a body too large to read, 503 when busy.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import threading
import time
import uuid

from ..errors import IA3Error, clipped
from .models import LOGPROBS, PROMPT_LOGPROBS, REQUEST_ID
from .openai_schema import (DEFAULT_MAX_TOKENS, ECHO_ONLY, APIError, chat_messages, choice, choice_requests, completion,
                            completion_prompts, error_response, generate_options, logprob_count, logprobs_object,
                            read_json, sse_event, text_field)


FIRST_RESPONSE_WAIT_S = 1.0  # a stream's headers wait at most this for its first response (a refusal: milliseconds)


class OpenAIFront:
    """The app on --openai-address:--openai-port (HTTPS with --openai-certfile), running on a thread of
    its own until `stop()`."""

    def __init__(self, server):
        import uvicorn

        c = server.config
        certificate, key = c.openai_tls or (None, None)
        self.app = create_app(server)
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            self.app, host=c.openai_host, port=c.openai_port, log_level="warning", access_log=False,
            http=timed_protocol(c.header_timeout_s), ssl_certfile=certificate, ssl_keyfile=key))
        self.thread = threading.Thread(target=self.uvicorn.run, name="ia3-openai", daemon=True)

    def start(self) -> "OpenAIFront":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise IA3Error("the OpenAI-compatible API did not start; check --openai-port and the log above")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)


def timed_protocol(header_timeout_s: float):
    """uvicorn's HTTP/1.1 protocol, closing a connection that has not sent a whole request head (request
    line and headers) within `header_timeout_s` of connecting or of its last answer. uvicorn times only a
    kept-alive connection, and any byte stops that clock: 3,000 connections that sent nothing, or half
    a head a byte at a time, stayed open for good (a slow-loris client holds a socket each). A body
    has its own deadline (`BODY_TIMEOUT_S`)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeout(H11Protocol):
        head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._time_the_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is in: a request is under way
                self._stop_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._time_the_head()  # the next request's head

        def connection_lost(self, exc) -> None:
            self._stop_timer()
            super().connection_lost(exc)

        def _time_the_head(self) -> None:
            self._stop_timer()
            self.head_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _stop_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _expire(self) -> None:
            self.head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeout


def create_app(server):
    """The Starlette app for a started `Server` (its Triton URL, adapter pool, tokenizer and streams)."""
    import httpx
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    from ..runtime.chat import ChatTemplate
    from .metrics import registry_for

    served, streams = server.served, server.streams
    base = server.config.served_model_name or _folder_name(server.session.folder.path)
    upstream = f"{server.url}/v2/models/generate_stream/generate_stream"
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10), headers=server.access_headers)
    template = ChatTemplate(server.session.folder.path)
    body_limit = 8 * server.config.max_text_bytes + 2**20  # a prompt's text JSON-escaped, and the rest
    registry = registry_for(server)

    def adapter_for(model) -> str:
        if model in (None, "", base):
            return ""
        if not isinstance(model, str):
            raise APIError(400, f"`model` must be a string (the base model's id or an adapter's name; GET /v1/models "
                                f"lists them), got {json.dumps(model)[:40]}")
        if model not in served.pool.names():
            raise APIError(404, f"The model `{clipped(model)}` does not exist: this server has {base!r} (no adapter) "
                                f"and the adapters {served.pool.names()}; GET /v1/models lists them", "NotFoundError")
        return model

    def model_cards() -> dict:
        """Model id -> OpenAI's model object: the base model, then each adapter with the base as parent."""
        created = int(time.time())
        return {name: {"id": name, "object": "model", "created": created, "owned_by": "ia3-export", "root": name,
                       "parent": None if name == base else base} for name in [base, *served.pool.names()]}

    async def tokens_of(body: dict) -> list[int]:
        """A chat's prompt ids (its template writes the special tokens), the tokenizer's child waited for
        off the event loop."""
        return await run_in_threadpool(template.encode, chat_messages(body), served.tokenizer)

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": list(model_cards().values())})

    @refusing
    async def model(request: Request):
        name = request.path_params["model"]
        if name not in (cards := model_cards()):
            raise APIError(404, f"The model `{clipped(name)}` does not exist: GET /v1/models lists this server's",
                           "NotFoundError")
        return JSONResponse(cards[name])

    async def metrics(request: Request):
        """Prometheus' text format: the engine's queue and batch, the adapters in use (serve/metrics.py)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @refusing
    async def health(request: Request):
        """vLLM's liveness probe on this port: 200 only while Triton reports every model ready."""
        try:
            ready = (await client.get(f"{server.url}/v2/health/ready", timeout=5)).status_code == 200
        except httpx.HTTPError:
            ready = False
        if not ready:
            raise APIError(503, "the server is not ready (starting or draining)", "ServiceUnavailableError")
        return Response(status_code=200)

    @refusing
    async def tokenize(request: Request):
        """vLLM's /tokenize: a completion's `prompt` text, or a chat's `messages`, as the ids the server
        would decode from, with their count and the context's length."""
        body = await read_json(request, body_limit)
        adapter_for(body.get("model"))
        if served.tokenizer is None:
            raise APIError(400, f"{served.session.folder.path} has no tokenizer.json; send token ids instead")
        if "messages" in body:
            ids = await tokens_of(body)
        else:
            ids = await run_in_threadpool(served.tokenizer.encode, text_field(body, "prompt"))
        return JSONResponse({"count": len(ids), "max_model_len": served.max_tokens, "tokens": ids})

    @refusing
    async def detokenize(request: Request):
        """vLLM's /detokenize: token ids -> text, as the server decodes an answer (special tokens skipped)."""
        body = await read_json(request, body_limit)
        adapter_for(body.get("model"))
        ids, vocab = body.get("tokens"), served.vocab_size or 2**63
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab for t in ids):
            raise APIError(400, f"`tokens` must be a list of token ids from 0 to {vocab - 1}")
        if served.tokenizer is None:
            raise APIError(400, f"{served.session.folder.path} has no tokenizer.json; it answers token ids only")
        return JSONResponse({"prompt": await run_in_threadpool(served.tokenizer.decode, ids)})

    @refusing
    async def load_adapter(request: Request):
        """vLLM's runtime adapter loading: {"lora_name", "lora_path"} (a PEFT IA3 folder or .onnx_adapter
        file on the server); the file is read off the event loop."""
        body = await read_json(request, body_limit)
        name, path = text_field(body, "lora_name"), text_field(body, "lora_path")
        name = await run_in_threadpool(served.pool.add, path, name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @refusing
    async def unload_adapter(request: Request):
        """vLLM's runtime adapter unloading: {"lora_name"}; requests running with it finish with it."""
        name = text_field(await read_json(request, body_limit), "lora_name")
        try:
            state = served.pool.remove(name)
        except IA3Error as e:
            raise APIError(404, str(e), "NotFoundError") from None
        more = "" if state == "removed" else " (new requests are refused; those running finish with it first)"
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.{more}")

    async def completions(request: Request):
        return await _complete(request, chat=False)

    async def chat_completions(request: Request):
        return await _complete(request, chat=True)

    @refusing
    async def _complete(request: Request, chat: bool):
        if streams is None:  # before any work on the body: nothing it holds could be served
            raise APIError(400, "this server batches whole requests (--batching request, or an export the engine "
                                "does not run); the OpenAI-compatible API needs --batching continuous")
        body = await read_json(request, body_limit)
        options = {**generate_options(body, chat), "adapter": adapter_for(body.get("model"))}
        echo, echo_only = body.get("echo") is True, options.pop(ECHO_ONLY, False)
        if (alternatives := logprob_count(body, chat)) is not None:
            options[LOGPROBS] = alternatives
            if echo:
                options[PROMPT_LOGPROBS] = alternatives
        if chat:
            prompts = [{"input_ids": await tokens_of(body)}]
            if "max_new_tokens" not in options and served.max_tokens:  # OpenAI's chat: up to the context's end
                options["max_new_tokens"] = max(1, served.max_tokens - len(prompts[0]["input_ids"]))
        else:
            prompts = completion_prompts(body)
        options.setdefault("max_new_tokens", DEFAULT_MAX_TOKENS)
        echoed = max(len(p.get("input_ids", ())) or served.max_tokens or 0 for p in prompts) if echo else 0
        requests = choice_requests(body, prompts, options, server.config.max_queue, echoed)
        n = len(requests) // len(prompts)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        model = body.get("model") or base
        # a prompt's tokens count once in the usage, however many choices it has (as OpenAI counts them)
        chunks = _merged([_upstream({**r, REQUEST_ID: f"{request_id}-{i}"}, counts_prompt=i % n == 0)
                          for i, r in enumerate(requests)])
        chunks = _echoed(chunks, await run_in_threadpool(echoed_texts, prompts) if echo else None, n, echo_only)
        if body.get("stream"):
            # the first response waited for (a little) before the headers: a refusal at submission (a prompt too
            # long, busy) is then an HTTP status, as vLLM answers it, not an error event in a 200 stream
            first = asyncio.ensure_future(anext(chunks, None))
            await asyncio.wait((first,), timeout=FIRST_RESPONSE_WAIT_S)
            if first.done():
                first.result()  # an APIError: refused
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_sse(_chained(first, chunks), len(requests), request_id, model, chat, usage),
                                     media_type="text/event-stream")
        return await _unless_gone(request, _whole(chunks, len(requests), request_id, model, chat))

    async def _whole(chunks, count: int, request_id: str, model: str, chat: bool):
        """A non-streamed answer: the `count` choices' streams gathered."""
        texts, reasons, counts, entries = [[] for _ in range(count)], [None] * count, [0, 0], [[] for _ in range(count)]
        async for i, piece, tokens, finish, prompt_len, logprobs in chunks:
            texts[i].append(piece)
            entries[i] += logprobs or []
            reasons[i] = finish or reasons[i]
            counts[0], counts[1] = counts[0] + prompt_len, counts[1] + tokens
        text_of = await token_texts([e for choice_entries in entries for e in choice_entries])
        choices = [choice(chat, True, i, "".join(t), r, logprobs=logprobs_object(chat, e, text_of))
                   for i, (t, r, e) in enumerate(zip(texts, reasons, entries))]
        return JSONResponse(completion(request_id, model, chat, choices, final=True, usage=tuple(counts)))

    def echoed_texts(prompts: list[dict]) -> list[str]:
        """Each prompt as `echo` returns it: its text as sent, or its token ids decoded ("" without a tokenizer)."""
        tokenizer = served.tokenizer
        return [p["text"] if "text" in p else tokenizer.decode(p["input_ids"]) if tokenizer else "" for p in prompts]

    async def token_texts(entries: list) -> dict:
        """Token id -> its own text, for every token and alternative in (id, log-probability, alternatives)
        entries: one call to the tokenizer's child, off the event loop (`token_id:N` without a tokenizer,
        as vLLM writes it)."""
        ids = sorted({i for i, _, _ in entries} | {j for _, _, top in entries for j, _ in top or ()})
        if not ids:
            return {}
        if served.tokenizer is None:
            return {i: f"token_id:{i}" for i in ids}
        return dict(zip(ids, await run_in_threadpool(served.tokenizer.pieces, ids)))

    async def _upstream(body: dict, counts_prompt: bool = True):
        """(text, new tokens, finish reason, prompt tokens: on the last response only, 0 unless `counts_prompt`,
        and where asked the new tokens' (id, log-probability, [(id, log-probability), ...]) and the prompt's,
        on the first response) per Triton response; an error body raises APIError. Leaving early cancels the
        request in the engine."""
        try:
            async with _reaching_triton(), client.stream("POST", upstream, json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode("utf-8", "replace")
                    raise APIError(_status(detail), _triton_error(detail))
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if event.get("error"):
                        raise APIError(_status(event["error"]), event["error"])
                    ids = event.get("output_ids", [])
                    ids = ids if isinstance(ids, list) else [ids]  # one token arrives as a number
                    logprobs = event.get("logprobs")
                    logprobs = [(i, lp, top) for i, (lp, top) in zip(ids, json.loads(logprobs))] if logprobs else None
                    scored = event.get("prompt_logprobs")  # on the first response only, where asked
                    scored = [tuple(entry) for entry in json.loads(scored)] if scored else None
                    yield (event.get("text", ""), len(ids), event.get("finish_reason") or None,
                           counts_prompt and event.get("prompt_tokens") or 0, logprobs, scored)
        finally:
            streams.cancel(body[REQUEST_ID])  # a no-op once it ended; stops the engine's row when the client left

    async def _sse(chunks, count: int, request_id: str, model: str, chat: bool, usage: bool):
        """The chunks of `count` choices, each naming its choice (a chat's first says each one's role); with
        `usage`, as OpenAI: every chunk has "usage": null and one more, with no choices, carries the
        request's usage before [DONE]."""
        counts, each = [0, 0], None if usage else False  # prompt tokens, completion tokens
        offsets = [0] * count  # each choice's text so far: a completion's logprobs give token offsets in it

        def chunk(*choices) -> str:
            return sse_event(completion(request_id, model, chat, list(choices), usage=each))

        try:
            if chat:
                yield chunk(*(choice(chat, False, i, "", None, role=True) for i in range(count)))
            async for i, piece, tokens, finish, prompt_len, entries in chunks:
                counts[0], counts[1] = counts[0] + prompt_len, counts[1] + tokens
                if piece or finish or entries:
                    text_of = await token_texts(entries) if entries else {}  # no tokenizer work without logprobs
                    logprobs = logprobs_object(chat, entries, text_of, offsets[i])
                    offsets[i] += len(piece)
                    yield chunk(choice(chat, False, i, piece, finish, logprobs=logprobs))
            if usage:
                yield sse_event(completion(request_id, model, chat, [], usage=tuple(counts)))
        except APIError as e:
            yield sse_event({"error": {"message": str(e), "type": e.kind, "code": e.status}})
        yield "data: [DONE]\n\n"

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    routes = [Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{model:path}", model, methods=["GET"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/tokenize", tokenize, methods=["POST"]),
              Route("/detokenize", detokenize, methods=["POST"]),
              Route("/v1/load_lora_adapter", load_adapter, methods=["POST"]),
              Route("/v1/unload_lora_adapter", unload_adapter, methods=["POST"])]
    key, capacity = server.config.api_key, server.config.max_batch + server.config.max_queue
    return Starlette(routes=routes, lifespan=lifespan, middleware=[
        *([Middleware(RequireKey, key=key)] if key else []), Middleware(Admission, capacity=capacity)])


class Admission:
    """At most `capacity` POSTs at once (--max-batch + --max-queue: what the engine runs and queues); past
    it a request is refused busy (503) before its body is read. Without it a flood of completions waited in
    the app for connections to Triton, on one event loop, until some failed with a 500, and every body was
    read into memory at once. Counted around the whole response, so a stream holds its place until it
    ends, however it ends; GETs (models, health, metrics) are not counted."""

    def __init__(self, app, capacity: int):
        self.app, self.capacity, self.open = app, capacity, 0  # one event loop: no lock

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.open >= self.capacity:
            error = APIError(503, f"busy: {self.open} requests in flight, the limit is {self.capacity} "
                                  "(--max-batch + --max-queue); retry later", "ServiceUnavailableError")
            return await error_response(error)(scope, receive, send)
        self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1


class RequireKey:
    """With --api-key, every route but the probes (/health, /metrics) answers 401 unless the request carries
    `Authorization: Bearer KEY`, as OpenAI's clients send it; checked before the body is read."""
    OPEN = ("/health", "/metrics")

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # in constant time: the key's prefix never leaks
                what = "a wrong API key" if given else "no API key"
                error = APIError(401, f"this server needs an API key and the request has {what}; send the server's "
                                      "key as `Authorization: Bearer KEY` (the openai client's api_key)",
                                 "AuthenticationError")
                return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


def refusing(route):
    """A route whose refusals become OpenAI's error body: an APIError as it is, an IA3Error (a request the
    runtime refused: its message names the fix) as a 400."""
    @functools.wraps(route)
    async def answer(*args, **kwargs):
        try:
            return await route(*args, **kwargs)
        except APIError as e:
            return error_response(e)
        except IA3Error as e:
            return error_response(APIError(400, str(e)))
        except ClientGone:
            from starlette.responses import Response
            return Response(status_code=499)  # nginx's "client closed request": logged, never read
    return answer


async def _echoed(chunks, prompt_texts: list[str] | None, n: int, only: bool):
    """The items without the prompt's log-probabilities; with `echo` (`prompt_texts`, one per prompt), each
    choice's prompt (its text, and its tokens' log-probabilities where asked) before its first piece, streamed
    or gathered; `only` (`max_tokens: 0`): the prompt alone, its one generated token left out and not counted."""
    started = set()
    async for i, piece, tokens, finish, prompt_len, entries, scored in chunks:
        if only:
            piece, tokens, entries, finish = "", 0, None, finish and "length"
        if prompt_texts is not None and i not in started:
            started.add(i)
            piece, entries = prompt_texts[i // n] + piece, (scored or []) + (entries or [])
        yield i, piece, tokens, finish, prompt_len, entries


async def _chained(first: asyncio.Future, rest):
    """`first`'s item (None: nothing), then the rest of the async iterator `rest`."""
    try:
        if (item := await first) is not None:
            yield item
        async for item in rest:
            yield item
    finally:
        first.cancel()  # the answer ended before its first item (the client left): stop waiting for it


class ClientGone(Exception):
    """The client disconnected before its answer: nobody to answer."""


async def _unless_gone(request, work):
    """`work`'s result, unless the client disconnects first: then `work` is cancelled (its streams' rows are
    cancelled in the engine as they close) and ClientGone raised. Without it a non-streamed request whose
    client left ran to its last token. The body is read by now, so the connection's next message is its end."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        raise ClientGone() from None


async def _merged(streams: list):
    """(prompt index, *item) from every prompt's stream as the items come; the first error ends it all,
    and leaving early (a client gone) stops every stream."""
    queue, done = asyncio.Queue(), object()

    async def pump(i, stream):
        try:
            async for item in stream:
                await queue.put((i, *item))
            await queue.put((i, done))
        except Exception as e:  # noqa: BLE001 - handed to the reader, which raises it
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item[1] is done:
                running -= 1
            elif isinstance(item[1], Exception):
                raise item[1]
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


@contextlib.asynccontextmanager
async def _reaching_triton():
    """Triton's port not answering (a connection refused or timed out, one cut) is a 503 to retry, not a 500."""
    import httpx

    try:
        yield
    except httpx.TransportError as e:
        raise APIError(503, f"the server's Triton endpoint did not answer ({type(e).__name__}); retry later",
                       "ServiceUnavailableError") from None


def _status(message: str) -> int:
    return 503 if message.startswith("busy") else 400


def _triton_error(detail: str) -> str:
    try:
        return json.loads(detail).get("error") or detail
    except (ValueError, AttributeError):
        return detail[:500]


def _folder_name(path: str) -> str:
    import os

    return os.path.basename(os.path.normpath(path))
