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
messages become the prompt through the tokenizer's chat template (`runtime.chat`); a completion with
several prompts is one Triton stream per prompt, merged into one answer. Errors use OpenAI's body
(`{"error": {"message", "type", "code"}}`) with 400 for a bad request, 404 for an unknown model, 413
for a body too large to read, 503 when busy. A parameter that would change the answer but is not
implemented (penalties, logprobs, tools...) is refused by name rather than ignored: a client must never
get a different answer than it asked for without knowing.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid

from ..errors import IA3Error
from .streaming import REQUEST_ID, STOP

FIELDS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed"}
INTEGERS = ("max_new_tokens", "seed")
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions (a chat's: the rest of the model's context)
# OpenAI's (and vLLM's) parameters this server does not implement -> the values that mean "off", which
# are accepted (clients such as LangChain send them); any other value is refused by name
NOT_IMPLEMENTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
                   "best_of": (None, 1), "suffix": (None, ""), "presence_penalty": (None, 0),
                   "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
                   "functions": (None, []), "tool_choice": (None, "none", "auto"),
                   "function_call": (None, "none", "auto"),
                   "response_format": (None, {"type": "text"}), "top_k": (None, 0, -1), "min_p": (None, 0),
                   "repetition_penalty": (None, 1), "min_tokens": (None, 0), "ignore_eos": (None, False)}


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


class OpenAIFront:
    """The app on `address:port`, running on a thread of its own until `stop()`."""

    def __init__(self, server, address: str, port: int):
        import uvicorn

        self.app = create_app(server)
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host=address, port=port, log_level="warning",
                                                     access_log=False))
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


def create_app(server):
    """The Starlette app for a started `Server` (its Triton URL, adapter pool, tokenizer and streams)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from ..runtime.chat import ChatTemplate
    from .metrics import registry_for

    served, streams = server.served, server.streams
    base = server.config.served_model_name or _folder_name(server.session.folder.path)
    upstream = f"{server.url}/v2/models/generate_stream/generate_stream"
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10))
    template = ChatTemplate(server.session.folder.path)
    body_limit = 8 * server.config.max_text_bytes + 2**20  # a prompt's text JSON-escaped, and the rest

    def adapter_for(model) -> str:
        if model in (None, "", base):
            return ""
        if not isinstance(model, str) or model not in served.pool.names():
            raise APIError(404, f"The model `{model}` does not exist: this server has {base!r} (no adapter) and the "
                                f"adapters {served.pool.names()}; GET /v1/models lists them", "NotFoundError")
        return model

    def model_cards() -> dict:
        """Model id -> OpenAI's model object: the base model, then each adapter with the base as parent."""
        created = int(time.time())
        return {name: {"id": name, "object": "model", "created": created, "owned_by": "ia3-export", "root": name,
                       "parent": None if name == base else base} for name in [base, *served.pool.names()]}

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": list(model_cards().values())})

    async def model(request: Request):
        name = request.path_params["model"]
        card = model_cards().get(name)
        if card is None:
            return _error(APIError(404, f"The model `{name}` does not exist: GET /v1/models lists this server's",
                                   "NotFoundError"))
        return JSONResponse(card)

    registry = registry_for(server)

    async def metrics(request: Request):
        """Prometheus' text format: the engine's queue and batch, the adapters in use (serve/metrics.py)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def health(request: Request):
        """vLLM's liveness probe on this port: 200 only while Triton reports every model ready."""
        try:
            ready = (await client.get(f"{server.url}/v2/health/ready", timeout=5)).status_code == 200
        except httpx.HTTPError:
            ready = False
        return Response(status_code=200) if ready else _error(APIError(503, "the server is not ready (starting or "
                                                                           "draining)", "ServiceUnavailableError"))

    async def tokenize(request: Request):
        """vLLM's /tokenize: a completion's `prompt` text, or a chat's `messages`, as the ids the server
        would decode from, with their count and the context's length."""
        try:
            body = await _json_body(request, body_limit)
            adapter_for(body.get("model"))
            if served.tokenizer is None:
                raise APIError(400, f"{served.session.folder.path} has no tokenizer.json; send token ids instead")
            if "messages" in body:
                ids = await run_in_threadpool(template.encode, _messages(body), served.tokenizer)
            else:
                ids = await run_in_threadpool(served.tokenizer.encode, _text(body, "prompt"))
        except APIError as e:
            return _error(e)
        except IA3Error as e:
            return _error(APIError(400, str(e)))
        return JSONResponse({"count": len(ids), "max_model_len": served.max_tokens, "tokens": ids})

    async def detokenize(request: Request):
        """vLLM's /detokenize: token ids -> text, as the server decodes an answer (special tokens skipped)."""
        try:
            body = await _json_body(request, body_limit)
            adapter_for(body.get("model"))
            ids = body.get("tokens")
            vocab = served.vocab_size or 2**63
            if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab for t in ids):
                raise APIError(400, f"`tokens` must be a list of token ids from 0 to {vocab - 1}")
            if served.tokenizer is None:
                raise APIError(400, f"{served.session.folder.path} has no tokenizer.json; it answers token ids only")
            text = await run_in_threadpool(served.tokenizer.decode, ids)
        except APIError as e:
            return _error(e)
        except IA3Error as e:
            return _error(APIError(400, str(e)))
        return JSONResponse({"prompt": text})

    async def load_adapter(request: Request):
        """vLLM's runtime adapter loading: {"lora_name", "lora_path"} (a PEFT IA3 folder or .onnx_adapter
        file on the server); the file is read off the event loop."""
        try:
            body = await _json_body(request, body_limit)
            name, path = _text(body, "lora_name"), _text(body, "lora_path")
            name = await run_in_threadpool(served.pool.add, path, name)
        except APIError as e:
            return _error(e)
        except IA3Error as e:
            return _error(APIError(400, str(e)))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(request: Request):
        """vLLM's runtime adapter unloading: {"lora_name"}; requests running with it finish with it."""
        try:
            name = _text(await _json_body(request, body_limit), "lora_name")
            state = served.pool.remove(name)
        except APIError as e:
            return _error(e)
        except IA3Error as e:
            return _error(APIError(404, str(e), "NotFoundError"))
        more = "" if state == "removed" else " (new requests are refused; those running finish with it first)"
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.{more}")

    async def completions(request: Request):
        return await _complete(request, chat=False)

    async def chat_completions(request: Request):
        return await _complete(request, chat=True)

    async def _complete(request: Request, chat: bool):
        try:
            body = await _json_body(request, body_limit)
            options = {**_options(body), "adapter": adapter_for(body.get("model"))}
            if chat:  # the template writes the special tokens; the tokenizer's child is waited for off the loop
                prompts = [{"input_ids": await run_in_threadpool(template.encode, _messages(body), served.tokenizer)}]
                if "max_new_tokens" not in options and served.max_tokens:  # OpenAI's chat: up to the context's end
                    options["max_new_tokens"] = max(1, served.max_tokens - len(prompts[0]["input_ids"]))
            else:
                prompts = _prompts(body, server.config.max_queue)
            options.setdefault("max_new_tokens", DEFAULT_MAX_TOKENS)
        except APIError as e:
            return _error(e)
        except IA3Error as e:
            return _error(APIError(400, str(e)))
        if streams is None:
            return _error(APIError(400, "this server batches whole requests (--batching request, or an export the "
                                        "engine does not run); the OpenAI-compatible API needs --batching continuous"))
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        model = body.get("model") or base
        chunks = _merged([_upstream({**options, **prompt, REQUEST_ID: f"{request_id}-{i}"})
                          for i, prompt in enumerate(prompts)])
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_sse(chunks, request_id, model, chat, usage), media_type="text/event-stream")
        texts, reasons, counts = [[] for _ in prompts], [None] * len(prompts), [0, 0]
        try:
            async for i, piece, tokens, finish, prompt_len in chunks:
                texts[i].append(piece)
                reasons[i] = finish or reasons[i]
                counts[0], counts[1] = counts[0] + prompt_len, counts[1] + tokens
        except APIError as e:
            return _error(e)
        choices = [_choice(chat, True, i, "".join(t), r) for i, (t, r) in enumerate(zip(texts, reasons))]
        return JSONResponse(_body(request_id, model, chat, choices, final=True, usage=tuple(counts)))

    async def _upstream(body: dict):
        """(text, new tokens, finish reason, prompt tokens: on the last response only) per Triton response;
        an error body raises APIError. Leaving early cancels the request in the engine."""
        try:
            async with client.stream("POST", upstream, json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode("utf-8", "replace")
                    raise APIError(_status(detail), _triton_error(detail))
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if event.get("error"):
                        raise APIError(_status(event["error"]), event["error"])
                    ids = event.get("output_ids") or []
                    yield (event.get("text", ""), len(ids) if isinstance(ids, list) else 1,
                           event.get("finish_reason") or None, event.get("prompt_tokens") or 0)
        finally:
            streams.cancel(body[REQUEST_ID])  # a no-op once it ended; stops the engine's row when the client left

    async def _sse(chunks, request_id: str, model: str, chat: bool, usage: bool):
        """The chunks, each naming its prompt's choice; with `usage`, as OpenAI: every chunk has "usage":
        null and one more, with no choices, carries the request's usage before [DONE]."""
        counts, each = [0, 0], None if usage else False  # prompt tokens, completion tokens
        try:
            if chat:
                yield _event(_body(request_id, model, chat, [_choice(chat, False, 0, "", None, role=True)], usage=each))
            async for i, piece, tokens, finish, prompt_len in chunks:
                counts[0], counts[1] = counts[0] + prompt_len, counts[1] + tokens
                if piece or finish:
                    yield _event(_body(request_id, model, chat, [_choice(chat, False, i, piece, finish)], usage=each))
            if usage:
                yield _event(_body(request_id, model, chat, [], usage=tuple(counts)))
        except APIError as e:
            yield _event({"error": {"message": str(e), "type": e.kind, "code": e.status}})
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
    return Starlette(routes=routes, lifespan=lifespan)


def _options(body: dict) -> dict:
    """Triton's generate parameters from OpenAI's; a parameter not implemented or of the wrong type is
    refused by name."""
    if body.get("n", 1) not in (None, 1):
        raise APIError(400, "`n` must be 1: each choice is one request; send several requests instead")
    for field, off in NOT_IMPLEMENTED.items():
        if body.get(field) not in off:
            raise APIError(400, f"`{field}` is not implemented by this server (it samples with temperature, "
                                f"top_p and seed, and stops at stop strings, EOS or max_tokens); leave it out")
    if not isinstance(body.get("stream", False), bool):
        raise APIError(400, "`stream` must be true or false")
    options = body.get("stream_options")
    if options is not None and (not body.get("stream") or not isinstance(options, dict)):
        raise APIError(400, "`stream_options` needs `\"stream\": true` and must be an object such as "
                            "{\"include_usage\": true}")
    out = {}
    for field, name in FIELDS.items():
        if field == "max_tokens" and field not in body:
            field = "max_completion_tokens"  # the chat API's newer name
        value = body.get(field)
        if value is None:
            continue
        integer = name in INTEGERS
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            kind = "an integer" if integer else "a number"
            raise APIError(400, f"`{field}` must be {kind}, got {json.dumps(value)[:40]}")
        if integer and not -2**63 <= value < 2**63:
            raise APIError(400, f"`{field}` is out of range, got {value}")
        out[name] = value
    if "temperature" in out:  # OpenAI's temperature 0 is greedy decoding
        if out["temperature"] == 0:
            del out["temperature"]
        else:
            out["do_sample"] = True
    stop = body.get("stop")
    if stop not in (None, "", []):
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise APIError(400, "`stop` must be a string or a list of strings")
        out[STOP] = json.dumps(stops)
    return out


def _messages(body: dict) -> list:
    """Chat messages, OpenAI's text parts joined into one string per message as vLLM does for text-only
    models (a template would otherwise render the list itself)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "`messages` must be a non-empty list of {role, content} objects")
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, "a message's `content` parts must all be text "
                                    "({\"type\": \"text\", \"text\": ...}): this server's models read text only")
            message = {**message, "content": "\n".join(p["text"] for p in content)}
        elif not isinstance(content, str):
            raise APIError(400, "each message needs a `content`: a string or a list of text parts")
        out.append(message)
    return out


def _prompts(body: dict, limit: int) -> list[dict]:
    """A completion's prompts, each `text` or `input_ids`: OpenAI's `prompt` is one string or token-id
    list, or a list of them (one choice each, as LangChain's batches send)."""
    prompt = body.get("prompt")
    many = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)
    prompts = [_one_prompt(p) for p in (prompt if many else [prompt])]
    if len(prompts) > limit:
        raise APIError(400, f"`prompt` holds {len(prompts)} prompts, more than the {limit} the engine queues "
                            "(--max-queue); send fewer per request")
    return prompts


def _one_prompt(prompt) -> dict:
    if isinstance(prompt, list) and prompt and all(type(t) is int and 0 <= t < 2**63 for t in prompt):
        return {"input_ids": prompt}
    if isinstance(prompt, str) and prompt:
        return {"text": prompt}
    raise APIError(400, "`prompt` must be a non-empty string or a list of token ids >= 0, or a list of these")


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


async def _json_body(request, limit: int) -> dict:
    """The JSON object sent, read no further than `limit` bytes (a huge body must not fill memory)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over {limit} bytes; send a shorter prompt (the limit is "
                                "8x --max-text-bytes, plus 1 MiB)")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError:
        raise APIError(400, "the request body is not JSON; send a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _text(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise APIError(400, f"`{name}` must be a non-empty string")
    return value


def _choice(chat: bool, final: bool, index: int, text: str, finish, role: bool = False) -> dict:
    """One choice of a completion (final) or of a streamed chunk, in OpenAI's shape for completions or chat."""
    if not chat:
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
    if final:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "finish_reason": finish, "logprobs": None}
    delta = {"role": "assistant", "content": ""} if role else {"content": text}
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}


def _body(request_id: str, model: str, chat: bool, choices: list, final: bool = False, usage=False) -> dict:
    """A completion (final) or a streamed chunk; `usage`: (prompt, completion) tokens, None for "usage":
    null, False for no usage field."""
    kind = ("chat.completion" if final else "chat.completion.chunk") if chat else "text_completion"
    body = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage is None:
        body["usage"] = None
    elif usage is not False:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    return body


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _error(error: APIError):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": str(error), "type": error.kind, "param": None, "code": error.status}},
                        status_code=error.status)


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
