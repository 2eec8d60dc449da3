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
