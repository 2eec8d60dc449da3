"""What every request path shares, checked in one place before any work, and the table of those paths.

A request path is anything that turns a user's request into tokens: `IA3Session.generate` and
`stream` (the `generate` command's), and each model `serve` offers. They all tokenize through the
session's tokenizer (runtime/tokenizer.py), whose `encode` calls `prompt_text` first, so a text is
measured in bytes and checked as UTF-8 before the tokenizer sees it (a 20 MB text used to cost
4 GB of tokenizer memory), and the tokenizer itself runs in a child process within
`Limits.tokenizer_timeout_s` (a tokenizer.json whose regex panics or backtracks costs one request
an error, never the process). Generation options are checked by `GenerationOptions` and capped by
`generation.new_token_budget` on every task.

`REQUEST_PATHS` lists the paths by name; each registers with `register` where it is defined, and
tests/runtime/test_requests.py sends every registered path the hostile requests (a new path is
walked without the test being told).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ..errors import IA3Error

MiB = 1024 * 1024
MAX_TEXT_BYTES = 1 * MiB  # a prompt; ~250,000 tokens of English, more than any model here takes
TOKENIZER_TIMEOUT_S = 10.0  # one encode or decode; a 1 MiB prompt takes well under a second
HEADER_TIMEOUT_S = 10.0  # a served request's line and headers (nginx's client_header_timeout is 60 s)
MAX_NEW_TOKENS = 4096  # the ceiling where a model names no positions (T5's relative positions)
MAX_PROMPT_TOKENS = 4096  # a prompt's ceiling there: its attention grows as its square (one prompt could sink a server)
SEED_MAX = 2**32 - 1  # numpy's and torch's seed range: what every seed option accepts
INT_MAX = 2**31 - 1  # counts a request or an option may give
SAMPLING_FIELDS = ("seed", "temperature", "top_k", "top_p", "min_p")  # options that only matter when sampling
# the numeric generation options every generating path takes (RequestPath.fields; the tests walk them)
NUMERIC_FIELDS = ("max_new_tokens", *SAMPLING_FIELDS, "repetition_penalty", "presence_penalty", "frequency_penalty",
                  "min_new_tokens")


@dataclasses.dataclass(frozen=True)
class Limits:
    """The bounds of one session's requests (`serve --max-text-bytes`, `generate --max-text-bytes`)."""

    max_text_bytes: int = MAX_TEXT_BYTES
    tokenizer_timeout_s: float = TOKENIZER_TIMEOUT_S
    max_new_tokens: int = MAX_NEW_TOKENS
    max_prompt_tokens: int = MAX_PROMPT_TOKENS

    def __post_init__(self):
        for name in ("max_text_bytes", "max_new_tokens", "max_prompt_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= INT_MAX:
                raise IA3Error(f"{name} is {value!r}; give a whole number from 1 to {INT_MAX}")
        if not isinstance(self.tokenizer_timeout_s, (int, float)) or not 0 < self.tokenizer_timeout_s <= 3600:
            raise IA3Error(f"tokenizer_timeout_s is {self.tokenizer_timeout_s!r}; give a number of seconds in (0, 3600]")


def prompt_text(value: str | bytes, limit: int) -> str:
    """`value` as text, once it is known to hold at most `limit` bytes of valid UTF-8.

    Bytes are counted before they are decoded; a str is refused by its length first (every
    character is at least one byte) and checked as UTF-8 by encoding it: the command line hands
    undecodable argv bytes over as lone surrogates, which encode only as the error they are."""
    if isinstance(value, str):
        if len(value) > limit:
            _too_long(f"at least {len(value)}", limit)
        try:
            value = value.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = value[e.start]
            byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"character U+{ord(bad):04X}"
            raise IA3Error(f"the prompt is not valid UTF-8 ({byte} at character {e.start}); send UTF-8 text") from None
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise IA3Error(f"the prompt is a {type(value).__name__}; send text (UTF-8)")
    if len(value) > limit:
        _too_long(str(len(value)), limit)
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise IA3Error(f"the prompt is not valid UTF-8 (byte 0x{value[e.start]:02x} at offset {e.start}); "
                       "send UTF-8 text") from None


def _too_long(size: str, limit: int) -> None:
    raise IA3Error(f"the prompt has {size} bytes, more than the {limit} a request may hold; send a shorter text "
                   "(or raise --max-text-bytes)")


@dataclasses.dataclass(frozen=True)
class RequestPath:
    """A way in for a request. `open(folder, limits)` starts it on an exported folder (a session, a
    served model) and returns `send(text=..., **fields) -> answer text`, which raises IA3Error for a
    refused request; `families` are the task families it serves (tasks.TASKS), `fields` the
    numeric request fields it takes (max_new_tokens, seed, temperature, top_p)."""

    name: str
    families: tuple[str, ...]
    fields: tuple[str, ...]
    open: Callable


REQUEST_PATHS: dict[str, RequestPath] = {}


def register(name: str, families: tuple[str, ...], fields: tuple[str, ...] = ()):
    """Decorator for a path's `open`: `@register("serve generate", ("causal-lm",), ("max_new_tokens",))`."""

    def add(open_path: Callable) -> Callable:
        REQUEST_PATHS[name] = RequestPath(name, tuple(families), tuple(fields), open_path)
        return open_path

    return add
