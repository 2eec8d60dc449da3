"""Chat messages -> prompt ids with the folder's own chat template, as transformers'
`apply_chat_template(messages, add_generation_prompt=True, tokenize=True)` gives them.

The template is the folder's `chat_template.jinja` (what transformers 5 saves), else
`chat_template.json`'s or tokenizer_config.json's `chat_template` (a string, or a list of named
templates: "default"). It is
untrusted code from a model folder, so it renders in jinja2's immutable sandbox (as transformers
does), with transformers' globals (`raise_exception`, `strftime_now`) and its `tojson` (no HTML
escaping); the special tokens of tokenizer_config.json are variables. The rendered text holds its own
special tokens, so it is encoded without adding any (a second BOS changes the answer).

The sandbox stops a template from reaching Python, not from looping or growing: two nested
`range(100000)` loops, or `"x" * 4000000000`, once held a server thread for good and grew it to 8 GB.
So `encode` renders in the tokenizer's child process (runtime/tokenizer.py: killed after
--tokenizer-timeout), the text is built piece by piece and refused past the prompt's byte limit, and
a repetition (`*`) or power (`**`) past MAX_REPEAT items or a 1024 exponent is refused before it is made.
"""
from __future__ import annotations

import datetime
import json
import os

from ..errors import IA3Error
from ..formats.jsonfile import read_json
from ..formats.reader import present, read_text, registers
from .requests import MAX_TEXT_BYTES

SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@registers("export_dir", ("tokenizer_config.json", "tokenizer"), ("chat_template.jinja", "text"),
           ("chat_template.json", "tokenizer"))
class ChatTemplate:
    def __init__(self, folder: str):
        self.folder, self.source, self.template, self.tokens = folder, None, None, {}
        config_path = os.path.join(folder, "tokenizer_config.json")
        config = read_json(config_path, "tokenizer") if present(config_path) else {}
        config = config if isinstance(config, dict) else {}
        self.tokens = {k: _content(config.get(k)) for k in SPECIAL if _content(config.get(k)) is not None}
        jinja_path, json_path = os.path.join(folder, "chat_template.jinja"), os.path.join(folder, "chat_template.json")
        if present(jinja_path):
            self.source, self.template = jinja_path, read_text(jinja_path, "text")
        elif present(json_path):
            stored = read_json(json_path, "tokenizer")
            self.source = json_path
            self.template = _named(stored.get("chat_template") if isinstance(stored, dict) else None, json_path)
        else:
            self.source, self.template = config_path, _named(config.get("chat_template"), config_path)

    def check(self, messages: list) -> None:
        """That there is a template, and that `messages` are what one renders."""
        if self.template is None:
            raise IA3Error(f"{self.folder} has no chat template (neither chat_template.jinja nor tokenizer_config.json's "
                           "chat_template); use /v1/completions with the prompt as text, or add a chat template")
        for message in messages:
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), (str, list, type(None)))):
                raise IA3Error("each message must be an object with a string `role` and a `content`")

    def render(self, messages: list, max_bytes: int = MAX_TEXT_BYTES) -> str:
        """The prompt text for `messages` with the assistant's turn opened (add_generation_prompt), built
        piece by piece and refused once it passes `max_bytes` (UTF-8; a prompt's limit)."""
        self.check(messages)
        pieces, size = [], 0
        try:
            for piece in _compile(self.template).generate(messages=messages, add_generation_prompt=True, **self.tokens):
                size += len(piece.encode("utf-8"))
                if size > max_bytes:
                    break
                pieces.append(piece)
        except MemoryError:
            raise  # the tokenizer's child says so and stops (tokenizer._serve)
        except Exception as e:  # jinja2's TemplateError, a sandbox SecurityError, or the template's raise_exception
            raise IA3Error(f"{self.source}: the chat template failed on these messages ({str(e)[:200]}); check the "
                           "messages' roles and order") from None
        if size > max_bytes:
            raise IA3Error(f"{self.source}: the chat template wrote more than {max_bytes} bytes for these messages, "
                           "more than a prompt may hold; send shorter messages (or raise --max-text-bytes), or fix "
                           "the template")
        return "".join(pieces)

    def encode(self, messages: list, tokenizer) -> list[int]:
        """Prompt ids: the rendered text, encoded without adding special tokens (the template wrote them).
        With the session's tokenizer (an IsolatedTokenizer) both run in its child, within its time limit."""
        if tokenizer is None:
            raise IA3Error(f"{self.folder} has no tokenizer.json; chat needs one")
        self.check(messages)
        return tokenizer.chat(messages)


def _named(template, path: str) -> str | None:
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise IA3Error(f"{path}: chat_template must be a string or a list of {{name, template}} with a 'default'")


def _content(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


_COMPILED: dict = {}
MAX_REPEAT = 2**24  # items one `*` in a template may make (a string of 16 MB at most, not 4 GB at once)


def _compile(source: str):
    if source not in _COMPILED:
        from jinja2 import TemplateError

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = _bounded_environment()(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
        _COMPILED[source] = env.from_string(source)
    return _COMPILED[source]


def _bounded_environment():
    """jinja2's immutable sandbox, with `*` and `**` checked: a string or list repeated past MAX_REPEAT
    items, or a power with a huge exponent, is a SecurityError before it is built."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                sized, count = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(sized, (str, list, tuple)) and isinstance(count, int) and len(sized) * count > MAX_REPEAT:
                    raise SecurityError(f"a repetition of {len(sized) * count} items (at most {MAX_REPEAT})")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
                raise SecurityError(f"a power with exponent {right}, past what a template needs")
            return super().call_binop(context, operator, left, right)

    return Bounded
