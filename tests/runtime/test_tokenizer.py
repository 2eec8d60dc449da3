"""The torch-free tokenizer gives the ids and text of transformers' AutoTokenizer on the same folder.

Reference: transformers' AutoTokenizer (`tok(text)["input_ids"]`, `tok.decode(ids, skip_special_tokens=True)`,
and each id decoded alone for `pieces`).
Folders: the shipped MiniLM (its tokenizer.json pads and truncates to 128) and tokenizers of three
styles trained here with the `tokenizers` library and saved through transformers, each once plain
and once with padding to 16 and truncation to 8 stored in tokenizer.json (as many hub files do).
"""
from __future__ import annotations

import json
import os

import pytest

from cli_helpers import assert_one_line_error, run_cli

TEXTS = ["", "Hello  World!", "  lead and trail  ", "naïve café — 日本語 🙂", "don 't do it , ok ?",
         "it's <s> a </s> test .", "<|endoftext|>x<pad>[SEP] [MASK]", "the quick brown fox jumps over the lazy dog " * 3]
CORPUS = ["the quick brown fox jumps over the lazy dog.", "Hello, world! It's a test, isn't it?",
          "naïve café déjà vu", "numbers 12345 and symbols #@%"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def styled_tokenizer(style: str, padded: bool):
    """A transformers fast tokenizer of a common style, trained on a small corpus (vocab <= 320).

    llama: byte-fallback BPE with "▁" spaces, BOS prepended; gpt2: byte-level BPE, nothing added;
    t5: Unigram with Metaspace, EOS appended, clean-up of tokenization spaces on decode."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "llama":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", *BYTE_TOKENS],
                                                            limit_alphabet=40))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
        specials, pad, side = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"), "<unk>", "left"
    elif style == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        specials, pad, side = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"), "<|endoftext|>", "left"
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"],
                                                                unk_token="<unk>"))
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", tok.token_to_id("</s>"))])
        specials, pad, side = dict(eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=True), "<pad>", "right"
    if padded:
        tok.enable_padding(length=16, pad_id=tok.token_to_id(pad), pad_token=pad, direction=side)
        tok.enable_truncation(max_length=8)
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side=side, **specials)


def save_styled(path, style: str, padded: bool, **config) -> str:
    """Save through transformers, then add tokenizer_config.json entries hub folders carry."""
    styled_tokenizer(style, padded).save_pretrained(str(path))
    if config:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            saved = json.load(f)
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(saved | config, f)
    return str(path)


def assert_like_transformers(folder: str, texts=TEXTS) -> None:
    from transformers import AutoTokenizer

    from ia3_export.runtime.tokenizer import TextTokenizer

    reference, ours = AutoTokenizer.from_pretrained(folder), TextTokenizer(folder)
    for text in texts:
        ids = reference(text)["input_ids"]
        assert ours.encode(text) == ids, (folder, text)
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), (folder, text, ids)
        # each token's own text (how a log-probability names it): special tokens kept, no clean-up
        assert ours.pieces(ids) == [reference.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                                    for i in ids], (folder, text, ids)


def test_minilm_as_transformers_tokenizes_it():
    """MiniLM's tokenizer.json pads to 128: the runtime must not (the demo's ONNX accuracy depended on it)."""
    from ia3_export.examples.shipped import minilm_dir

    with open(os.path.join(minilm_dir(), "tokenizer.json")) as f:
        assert json.load(f)["padding"]["strategy"] == {"Fixed": 128}  # what makes this test bite
    assert_like_transformers(minilm_dir(), TEXTS + ["Hello, I'm here ; isn't it ?", "review " * 200])


@pytest.mark.parametrize("style", ["llama", "gpt2", "t5"])
def test_styled_tokenizers_as_transformers(tmp_path, style):
    """Special tokens as the style adds them, no stored padding/truncation, clean-up where asked."""
    for padded in (False, True):
        assert_like_transformers(save_styled(tmp_path / f"{style}-{padded}", style, padded))


def test_tokenizer_config_entries_as_transformers_reads_them(tmp_path):
    """A named special token missing from tokenizer.json is added (a new id, also inside text);
    add_bos_token/add_eos_token in tokenizer_config.json change nothing when tokenizer.json exists."""
    from transformers import AutoTokenizer

    folder = save_styled(tmp_path / "gpt2-pad", "gpt2", False, pad_token="<pad>")
    assert AutoTokenizer.from_pretrained(folder)("a<pad>")["input_ids"][-1] == 300  # the reference adds it
    assert_like_transformers(folder)
    assert_like_transformers(save_styled(tmp_path / "llama-eos", "llama", True, add_bos_token=True, add_eos_token=True))
    assert_like_transformers(save_styled(tmp_path / "gpt2-bos", "gpt2", False, add_bos_token=True))


def test_generate_command_prints_what_transformers_generates(tmp_path):
    """A tiny Llama whose tokenizer.json pads to 16: `ia3-export generate` on its merged export prints
    the text transformers' greedy generate gives, decoded with the same folder's AutoTokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ia3_export.examples.tiny import save_tiny

    model_dir = save_tiny(str(tmp_path / "llama"), "llama")
    save_styled(model_dir, "llama", True)
    out = tmp_path / "onnx"
    result = run_cli("export", model_dir, "--out", out, "--mode", "merged")
    assert result.exit_code == 0, result.output
    prompts = ["the quick brown fox", "Hello, world! It's"]
    tokenizer, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    expected = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8)
        expected.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    result = run_cli("generate", out, "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    assert result.stdout == "".join(text + "\n" for text in expected)


@pytest.mark.parametrize("style,cls", [("llama", "LlamaTokenizer"), ("t5", "T5Tokenizer")])
def test_export_writes_the_tokenizer_transformers_builds(tmp_path, style, cls):
    """A model-specific tokenizer class makes transformers 5 rebuild the pipeline from the vocabulary
    (repeated and leading spaces then split differently from tokenizer.json as stored): the export
    writes the pipeline transformers uses, so the runtime on the export tokenizes as transformers on
    the model folder."""
    from transformers import AutoTokenizer

    from ia3_export.runtime.tokenizer import TextTokenizer
    from ia3_export.examples.tiny import save_tiny

    model_dir = save_tiny(str(tmp_path / "llama"), "llama")
    save_styled(model_dir, style, False, tokenizer_class=cls)
    texts = TEXTS + [" x", "a   b    c", "hello\n\nworld"]
    reference = AutoTokenizer.from_pretrained(model_dir)
    stored = TextTokenizer(model_dir)
    assert any(stored.encode(t) != reference(t)["input_ids"] for t in texts)  # what makes this test bite
    result = run_cli("export", model_dir, "--out", tmp_path / "onnx", "--mode", "merged")
    assert result.exit_code == 0, result.output
    ours = TextTokenizer(str(tmp_path / "onnx"))
    for text in texts:
        ids = reference(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
    assert AutoTokenizer.from_pretrained(str(tmp_path / "onnx"))(texts[1])["input_ids"] == reference(texts[1])["input_ids"]


# -- hostile tokenizer files and prompts (runtime/requests.py, the IsolatedTokenizer) -----------------
@pytest.fixture(scope="module")
def llama_export(tmp_path_factory, model_dir):
    from runtime_helpers import export_once

    return export_once(tmp_path_factory, model_dir("llama"), "merged", [])


def hostile_copy(tmp_path, export, name: str, write) -> str:
    import shutil

    folder = tmp_path / "onnx"
    shutil.copytree(export, folder)
    write(folder / name)
    return str(folder)


def sparse(path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


@pytest.mark.parametrize("name, write, message", [
    ("tokenizer.json", lambda p: sparse(p, 3 << 30), "tokenizer.json: 3221225472 bytes, more than the 536870912 a tokenizer"),
    ("tokenizer_config.json", lambda p: p.write_text("[" * 100_000 + "]" * 100_000),
     "tokenizer_config.json: JSON nested 100000 levels deep (at most 64 are read)"),
    ("tokenizer.json", lambda p: p.write_text("{not json"), "tokenizer.json: not a readable tokenizer"),
])
def test_hostile_tokenizer_files_are_one_line(tmp_path, llama_export, name, write, message):
    """A 3 GB sparse tokenizer.json cost 3.1 GB of memory; a config nested 100,000 deep was an internal error."""
    folder = hostile_copy(tmp_path, llama_export, name, write)
    assert_one_line_error(run_cli("generate", folder, "--prompt", "hi", "--max-new-tokens", "2"), 2, message)


def test_a_panicking_tokenizer_is_one_line_on_the_command_line(tmp_path, llama_export):
    """Oniguruma panics past its retry limit (PanicException, a BaseException): it printed a 163-line
    traceback; now the tokenizer's process dies alone and the command says so in one line."""
    def write(path):
        tok = json.loads((path.parent / "tokenizer.json").read_text())
        split = {"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated", "invert": False}
        tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, *filter(None, [tok["pre_tokenizer"]])]}
        path.write_text(json.dumps(tok))

    folder = hostile_copy(tmp_path, llama_export, "tokenizer.json", write)
    result = run_cli("generate", folder, "--prompt", "a" * 40 + "b", "--max-new-tokens", "2")
    assert_one_line_error(result, 2, "the tokenizer failed on this request (PanicException: Onig: Regex search error")


def test_a_prompt_of_invalid_utf8_bytes_is_one_line(llama_export):
    """argv bytes that are not UTF-8 reach Python as lone surrogates; the tokenizer used to fail on them."""
    import subprocess

    from cli_helpers import EXE

    done = subprocess.run([EXE, "generate", llama_export, "--prompt", b"caf\xe9"], capture_output=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.decode().strip() == ("error: the prompt is not valid UTF-8 (byte 0xe9 at character 3); "
                                            "send UTF-8 text")


def test_a_prompt_file_is_read_as_utf8_within_the_text_limit(tmp_path, llama_export):
    """--prompt-file goes through the reader (a regular file, UTF-8) and the same byte limit as --prompt."""
    good, latin, fifo = tmp_path / "good.txt", tmp_path / "latin.txt", tmp_path / "fifo"
    good.write_text("hello world")
    latin.write_bytes(b"caf\xe9")
    os.mkfifo(fifo)
    same = run_cli("generate", llama_export, "--prompt", "hello world", "--max-new-tokens", "3")
    from_file = run_cli("generate", llama_export, "--prompt-file", good, "--max-new-tokens", "3")
    assert from_file.exit_code == 0 and from_file.stdout == same.stdout, from_file.output
    assert_one_line_error(run_cli("generate", llama_export, "--prompt-file", latin), 2,
                          "latin.txt: not UTF-8 text (byte 3); save it as UTF-8")
    assert_one_line_error(run_cli("generate", llama_export, "--prompt-file", fifo), 2, "fifo is a FIFO (named pipe)")
    assert_one_line_error(run_cli("generate", llama_export, "--prompt-file", good, "--max-text-bytes", "5"), 2,
                          "the prompt has at least 11 bytes, more than the 5 a request may hold")
    assert_one_line_error(run_cli("generate", llama_export), 2, "give a prompt: --prompt TEXT or --prompt-file PATH")
