"""Chat messages become the prompt ids transformers' apply_chat_template gives on the same folder."""
from __future__ import annotations

import os

import pytest

from ia3_export.errors import IA3Error
from ia3_export.examples.tiny import CHAT_TEMPLATE
from ia3_export.runtime.chat import ChatTemplate
from ia3_export.runtime.tokenizer import TextTokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello, there"},
            {"role": "assistant", "content": "hi"}, {"role": "user", "content": "ünïcode & <tags>"}]


@pytest.fixture(scope="module")
def chat_folder(model_dir, tmp_path_factory):
    import shutil

    folder = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(model_dir("llama"), folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return str(folder)


def test_prompt_ids_equal_transformers_apply_chat_template(chat_folder):
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(chat_folder).apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                                             tokenize=True, return_dict=False)
    ours = ChatTemplate(chat_folder).encode(MESSAGES, TextTokenizer(chat_folder))
    assert ours == list(expected)
    bos = TextTokenizer(chat_folder).tokenizer.token_to_id("<s>")
    assert ours[0] == bos and ours.count(bos) == 1  # the template's BOS, and no second one from encoding


def test_template_in_tokenizer_config_and_its_errors(chat_folder, tmp_path):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(chat_folder, folder)
    os.remove(folder / "chat_template.jinja")
    with pytest.raises(IA3Error, match="has no chat template"):
        ChatTemplate(str(folder)).render(MESSAGES)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    template = ChatTemplate(str(folder))
    assert template.render(MESSAGES[:2]).startswith("<s><|system|>\nBe brief.</s>\n<|user|>")
    with pytest.raises(IA3Error, match="the chat template failed on these messages .roles are system, user and assistant"):
        template.render([{"role": "tool", "content": "x"}])
    with pytest.raises(IA3Error, match="each message must be an object with a string `role`"):
        template.render([{"content": "x"}])


def test_a_template_cannot_leave_the_sandbox(chat_folder, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(chat_folder, folder)
    (folder / "chat_template.jinja").write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(IA3Error, match="the chat template failed"):
        ChatTemplate(str(folder)).render(MESSAGES)


def test_chat_renders_in_the_tokenizers_child_equal_to_transformers(chat_folder):
    """The session's tokenizer (IsolatedTokenizer) renders and encodes a chat in its child process: the
    same ids as transformers' apply_chat_template."""
    from transformers import AutoTokenizer

    from ia3_export.runtime.tokenizer import IsolatedTokenizer

    expected = AutoTokenizer.from_pretrained(chat_folder).apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                                             tokenize=True, return_dict=False)
    isolated = IsolatedTokenizer(chat_folder)
    try:
        assert ChatTemplate(chat_folder).encode(MESSAGES, isolated) == list(expected)
    finally:
        isolated.close()


HOSTILE = ('{% if messages[0].content == "spin" %}{% for i in range(100000) %}{% for j in range(100000) %}'
           '{% endfor %}{% endfor %}{% elif messages[0].content == "grow" %}{% for i in range(100000) %}'
           '{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}{% elif messages[0].content == "huge" %}'
           '{{ "x" * 4000000000 }}{% elif messages[0].content == "double" %}{% set ns = namespace(s="x") %}'
           '{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s[:3] }}{% endif %}'
           '<s>{{ messages[0].content }}')


def test_a_hostile_chat_template_costs_one_request(chat_folder, tmp_path):
    """A template is code from the model folder: two nested range(100000) loops once held a server thread
    for good (and grew it to 8 GB when they wrote), `"x" * 4000000000` made 4 GB at once. Rendered in the
    tokenizer's child, the spinning one is stopped at the time limit, the growing one at the prompt's byte
    limit, the huge one before it is built, the one doubling a string with `~` (2^40 bytes, written 3 at a
    time: no byte limit sees it) at the child's memory cap; the next chat is answered."""
    import shutil
    import time

    from ia3_export.runtime.requests import Limits
    from ia3_export.runtime.tokenizer import IsolatedTokenizer

    folder = tmp_path / "model"
    shutil.copytree(chat_folder, folder)
    (folder / "chat_template.jinja").write_text(HOSTILE)
    template, isolated = ChatTemplate(str(folder)), IsolatedTokenizer(str(folder), Limits(tokenizer_timeout_s=5))
    try:
        for content, message, most_s in [
                ("spin", r"the tokenizer took longer than 5 s on this request .* or chat template \(a loop\)", 10),
                ("grow", r"the chat template wrote more than 1048576 bytes for these messages", 10),
                ("huge", r"the chat template failed on these messages \(a repetition of 4000000000 items", 2),
                ("double", r"needed more than 1024 MiB of memory on this request and was stopped", 5)]:
            start = time.monotonic()
            with pytest.raises(IA3Error, match=message):
                template.encode([{"role": "user", "content": content}], isolated)
            assert time.monotonic() - start < most_s, content
            assert template.encode([{"role": "user", "content": "hi"}], isolated) == \
                TextTokenizer(str(folder)).encode("<s>hi", add_special_tokens=False)
    finally:
        isolated.close()
