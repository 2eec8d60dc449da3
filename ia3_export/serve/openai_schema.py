"""OpenAI's request fields and answer shapes, as the OpenAI-compatible API (`openai_api`) reads and
writes them: a body's generation parameters, prompts and chat messages checked and turned into Triton's
generate parameters (a parameter that would change the answer but is not implemented is refused by
name, never ignored: a client must not get another answer than it asked for without knowing), and
completions, chunks and errors in OpenAI's JSON.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import time

import numpy as np

from ..errors import capped
from ..runtime.generation import MAX_LOGPROBS
from ..runtime.requests import SEED_MAX
from .models import LOGPROBS, STOP, Generate

# OpenAI's (and vLLM's) generation fields -> Triton's generate inputs (GenerationOptions checks the ranges)
FIELDS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
          "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
          "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
          "min_tokens": "min_new_tokens", "ignore_eos": "ignore_eos"}
INTEGERS = ("max_new_tokens", "seed", "top_k", "min_new_tokens")
FLAGS = ("ignore_eos",)
# the integer range of each integer input's tensor: Triton's JSON reader wraps a value past it
# (max_new_tokens 2**32 + 5 would arrive as 5), so the front refuses it first
PORT_RANGES = {port.name: np.iinfo(port.dtype) for port in Generate.inputs if port.name in INTEGERS}
BODY_TIMEOUT_S = 60  # the most a request's whole body may take to arrive (nginx waits 60 s between two reads)
LOWEST_LOGPROB = -9999.0  # what an impossible token's log-probability (-inf) is written as
MAX_LOGPROB_ENTRIES = 2**20  # log-probabilities one answer may hold (~100 MB of JSON): n x prompts x tokens x k
LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # the escape a lone surrogate needs (a pair starts so too)
ECHO_ONLY = "echo_only"  # not a Triton parameter: `max_tokens: 0` with `echo`, the answer is the prompt alone
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions (a chat's: the rest of the model's context)
# OpenAI's (and vLLM's) parameters this server does not implement -> the values that mean "off", which
# are accepted (clients such as LangChain send them); any other value is refused by name
NOT_IMPLEMENTED = {"best_of": (None, 1), "suffix": (None, ""), "tools": (None, []),
                   "functions": (None, []), "tool_choice": (None, "none", "auto"),
                   "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"})}


class APIError(Exception):
    """A request the API refuses: its HTTP status, OpenAI's error type and a one-line message."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(capped(message))
        self.status, self.kind = status, kind


def generate_options(body: dict, chat: bool) -> dict:
    """Triton's generate parameters from OpenAI's; a parameter not implemented or of the wrong type is
    refused by name."""
    for field, off in {**NOT_IMPLEMENTED, **({"echo": (None, False)} if chat else {})}.items():
        if body.get(field) not in off:
            raise APIError(400, f"`{field}` is not implemented by this server (it generates text with OpenAI's "
                                f"sampling, penalty and stop parameters and vLLM's top_k, min_p, repetition_penalty, "
                                f"min_tokens and ignore_eos); leave it out")
    for flag in ("stream", "echo"):
        if not isinstance(body.get(flag, False), bool):
            raise APIError(400, f"`{flag}` must be true or false")
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
        if field == "max_tokens" and type(value) is int and value == 0 and body.get("echo") is True:
            value = out[ECHO_ONLY] = 1  # the prompt alone, scored (vLLM's): one token generated, then dropped
        if field == "top_k" and value == -1 and type(value) is int:  # vLLM's "off"
            continue
        integer = name in INTEGERS
        if name in FLAGS:
            if not isinstance(value, bool):
                raise APIError(400, f"`{field}` must be true or false, got {json.dumps(value)[:40]}")
        elif isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            kind = "an integer" if integer else "a number"
            raise APIError(400, f"`{field}` must be {kind}, got {json.dumps(value)[:40]}")
        if integer and not PORT_RANGES[name].min <= value <= PORT_RANGES[name].max:  # Triton would wrap it
            raise APIError(400, f"`{field}` is out of range, got {value} (at most {PORT_RANGES[name].max})")
        out[name] = value
    if "temperature" in out:  # OpenAI's temperature 0 is greedy decoding
        if out["temperature"] == 0:
            del out["temperature"]
        else:
            out["do_sample"] = True
    bias = body.get("logit_bias")
    if bias is not None:  # keys are JSON strings: GenerationOptions reads them as ids, the engine checks the vocabulary
        if not isinstance(bias, dict):
            raise APIError(400, f"`logit_bias` must be an object of token ids to biases, got {json.dumps(bias)[:40]}")
        if bias:
            out["logit_bias"] = json.dumps(bias)
    stop = body.get("stop")
    if stop not in (None, "", []):
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise APIError(400, "`stop` must be a string or a list of strings")
        out[STOP] = json.dumps(stops)
    return out


def logprob_count(body: dict, chat: bool) -> int | None:
    """How many alternatives' log-probabilities each new token reports, None where none are asked: a
    completion's `logprobs` (an integer), a chat's `logprobs: true` with its `top_logprobs`."""
    if chat:
        wanted, top = body.get("logprobs"), body.get("top_logprobs")
        if wanted not in (None, True, False):
            raise APIError(400, "`logprobs` must be true or false (a chat's alternatives are `top_logprobs`)")
        if not wanted:
            if top not in (None, 0):
                raise APIError(400, "`top_logprobs` needs `\"logprobs\": true`")
            return None
        field, count = "top_logprobs", 0 if top is None else top
    else:
        field, count = "logprobs", body.get("logprobs")
        if count is None or count is False:
            return None
    if type(count) is not int or not 0 <= count <= MAX_LOGPROBS:
        raise APIError(400, f"`{field}` must be an integer from 0 to {MAX_LOGPROBS}, got {json.dumps(count)[:40]}")
    return count


def logprobs_object(chat: bool, entries: list, text_of: dict, offset: int = 0) -> dict | None:
    """OpenAI's `logprobs` for a choice (or a chunk of one) from (token id, log-probability, [(id,
    log-probability), ...]) entries, `text_of` giving each id's own text: a chat's `content` list, or a
    completion's token lists with each token's offset in the text from `offset`. None without tokens.
    -inf is written -9999.0, as vLLM does (JSON has no infinity)."""
    if not entries:
        return None

    def finite(logprob: float | None) -> float | None:  # None: an echoed prompt's first token, which nothing predicts
        return logprob if logprob is None or logprob > LOWEST_LOGPROB else LOWEST_LOGPROB

    if chat:
        def token(i, logprob):
            return {"token": text_of[i], "logprob": finite(logprob), "bytes": list(text_of[i].encode())}
        return {"content": [{**token(i, lp), "top_logprobs": [token(j, l) for j, l in top]} for i, lp, top in entries]}
    offsets = itertools.accumulate((len(text_of[i]) for i, _, _ in entries[:-1]), initial=offset)
    return {"tokens": [text_of[i] for i, _, _ in entries], "token_logprobs": [finite(lp) for _, lp, _ in entries],
            "top_logprobs": [None if top is None else {text_of[j]: finite(l) for j, l in top} for _, _, top in entries],
            "text_offset": list(offsets)}


def chat_messages(body: dict) -> list:
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


def completion_prompts(body: dict) -> list[dict]:
    """A completion's prompts, each `text` or `input_ids`: OpenAI's `prompt` is one string or token-id
    list, or a list of them (one choice each, as LangChain's batches send)."""
    prompt = body.get("prompt")
    many = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)
    return [one_prompt(p) for p in (prompt if many else [prompt])]


def choice_requests(body: dict, prompts: list[dict], options: dict, limit: int, echoed: int = 0) -> list[dict]:
    """One engine request per choice, in OpenAI's order (prompt by prompt, `n` choices each). Choice j of
    a seeded request is seeded `seed + j`, as vLLM seeds a request's n children: each equals that request
    alone. At most `limit` (--max-queue) in all, and at most MAX_LOGPROB_ENTRIES log-probabilities
    (`echoed`: the most prompt tokens a choice's echo adds to them)."""
    n = 1 if body.get("n") is None else body["n"]
    if type(n) is not int or n < 1:
        raise APIError(400, f"`n` must be an integer >= 1, got {json.dumps(n)[:40]}")
    if len(prompts) * n > limit:
        what = f"`prompt` holds {len(prompts)} prompts" if n == 1 else \
            f"{len(prompts)} prompt(s) x `n` {n} = {len(prompts) * n} choices"
        raise APIError(400, f"{what}, more than the {limit} the engine queues (--max-queue); send fewer per request")
    alternatives, most = options.get(LOGPROBS), options.get("max_new_tokens", 1) + echoed
    if alternatives is not None and len(prompts) * n * most * (alternatives + 1) > MAX_LOGPROB_ENTRIES:
        raise APIError(400, f"{len(prompts) * n} choice(s) of up to {most} tokens with {alternatives} alternatives "
                            f"each would answer {len(prompts) * n * most * (alternatives + 1)} log-probabilities, "
                            f"more than the {MAX_LOGPROB_ENTRIES} one request may; ask for fewer tokens, "
                            "choices or alternatives")
    seed = options.get("seed")
    seeded = isinstance(seed, int) and 0 <= seed <= SEED_MAX  # another seed is the engine's to refuse
    return [{**options, **prompt, **({"seed": (seed + j) % (SEED_MAX + 1)} if seeded and j else {})}
            for prompt in prompts for j in range(n)]


def one_prompt(prompt) -> dict:
    """`text` for a string, `input_ids` for a list of token ids (their range is the model's to check)."""
    if isinstance(prompt, list) and prompt and all(type(t) is int and 0 <= t < 2**63 for t in prompt):
        return {"input_ids": prompt}
    if isinstance(prompt, str) and prompt:
        return {"text": prompt}
    raise APIError(400, "`prompt` must be a non-empty string or a list of token ids >= 0, or a list of these")


async def read_json(request, limit: int, timeout_s: float = BODY_TIMEOUT_S) -> dict:
    """The JSON object sent, read no further than `limit` bytes (a huge body must not fill memory) and for no
    longer than `timeout_s` (a body that trickles in holds one of the places the server admits)."""
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"the request body is over {limit} bytes; send a shorter prompt (the limit is "
                                        "8x --max-text-bytes, plus 1 MiB)")
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s ({size} bytes came); send it "
                            "whole at once") from None
    body = parse_json(b"".join(chunks))
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def parse_json(raw: bytes):
    """Strict JSON: what Python's reader lets through but JSON forbids (NaN, Infinity, a lone UTF-16
    surrogate, which no UTF-8 text can hold) or cannot nest (past ~1,000 levels) is refused here, in the
    one place every request body passes, instead of failing later as an HTTP 500."""
    try:
        body = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
        if LONE_SURROGATE.search(raw):  # an escape such as \ud800: fine if paired; checked only when one is there
            json.dumps(body, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise APIError(400, "the request body nests deeper than this server reads (~1,000 levels); send a "
                            "flatter JSON object") from None
    except UnicodeEncodeError:
        raise APIError(400, "the request body holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                            "escape); send valid Unicode text") from None
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                            "send JSON in UTF-8") from None
    except ValueError as e:
        raise APIError(400, str(e) if isinstance(e, NotJSON) else "the request body is not JSON; send a JSON "
                                                                   "object") from None
    return body


class NotJSON(ValueError):
    """A value Python's JSON reader accepts and JSON does not."""


def _not_json(constant: str):
    raise NotJSON(f"the request body holds {constant}, which JSON does not allow; send finite numbers")


def _finite(text: str) -> float:
    """A JSON number as a float; one past float's range (1e999) would read as infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise NotJSON(f"the request body holds the number {text[:40]}, past a float's range; send a smaller one")
    return value


def text_field(body: dict, name: str) -> str:
    """A field that must be a non-empty string (an adapter's name or path, a prompt to tokenize)."""
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise APIError(400, f"`{name}` must be a non-empty string")
    return value


def choice(chat: bool, final: bool, index: int, text: str, finish, role: bool = False, logprobs=None) -> dict:
    """One choice of a completion (final) or of a streamed chunk, in OpenAI's shape for completions or chat."""
    if not chat:
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
    if final:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs}
    delta = {"role": "assistant", "content": ""} if role else {"content": text}
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}


def completion(request_id: str, model: str, chat: bool, choices: list, final: bool = False, usage=False) -> dict:
    """A completion (final) or a streamed chunk; `usage`: (prompt, completion) tokens, None for "usage":
    null, False for no usage field."""
    kind = ("chat.completion" if final else "chat.completion.chunk") if chat else "text_completion"
    body = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage is None:
        body["usage"] = None
    elif usage is not False:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    return body


def sse_event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def error_response(error: APIError):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": str(error), "type": error.kind, "param": None, "code": error.status}},
                        status_code=error.status)
