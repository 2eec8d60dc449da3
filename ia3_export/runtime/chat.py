"""Chat messages -> prompt ids with the folder's own chat template, as transformers'
`apply_chat_template(messages, add_generation_prompt=True, tokenize=True)` gives them.

The template is the folder's `chat_template.jinja` (what transformers 5 saves), else
`chat_template.json`'s or tokenizer_config.json's `chat_template` (a string, or a list of named
templates: "default"). It is
untrusted code from a model folder, so it renders in jinja2's immutable sandbox (as transformers
does), with transformers' globals (`raise_exception`, `strftime_now`) and its `tojson` (no HTML
escaping); the special tokens of tokenizer_config.json are variables. The rendered text holds its own
special tokens, so it is encoded without adding any (a second BOS changes the answer).
"""
from __future__ import annotations

import datetime
import json
import os

from ..errors import IA3Error
from ..formats.jsonfile import read_json
from ..formats.reader import present, read_text, registers

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

    def render(self, messages: list) -> str:
        """The prompt text for `messages` with the assistant's turn opened (add_generation_prompt)."""
        if self.template is None:
            raise IA3Error(f"{self.folder} has no chat template (neither chat_template.jinja nor tokenizer_config.json's "
                           "chat_template); use /v1/completions with the prompt as text, or add a chat template")
        for message in messages:
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), (str, list, type(None)))):
                raise IA3Error("each message must be an object with a string `role` and a `content`")
        try:
            return _compile(self.template).render(messages=messages, add_generation_prompt=True, **self.tokens)
        except Exception as e:  # jinja2's TemplateError, a sandbox SecurityError, or the template's raise_exception
            raise IA3Error(f"{self.source}: the chat template failed on these messages ({str(e)[:200]}); check the "
                           "messages' roles and order") from None

    def encode(self, messages: list, tokenizer) -> list[int]:
        """Prompt ids: the rendered text, encoded without adding special tokens (the template wrote them)."""
        if tokenizer is None:
            raise IA3Error(f"{self.folder} has no tokenizer.json; chat needs one")
        return tokenizer.encode(self.render(messages), add_special_tokens=False)


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


def _compile(source: str):
    if source not in _COMPILED:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
        _COMPILED[source] = env.from_string(source)
    return _COMPILED[source]
