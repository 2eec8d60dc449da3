"""Streaming: text pieces come as tokens are chosen, never split a UTF-8 character, and join to the
non-streamed text; the CLI prints the same; bank batches with per-row adapters keep working."""
from __future__ import annotations

import pytest

from cli_helpers import run_cli
from runtime_helpers import export_once, peft_greedy

TEXT = "héllo wörld, 日本語 🙂!"


@pytest.fixture(scope="module")
def llama(tmp_path_factory, model_dir, adapter_dir):
    base = model_dir("llama")
    a1, a2 = adapter_dir("llama", seed=1), adapter_dir("llama", seed=2)
    return {"base": base, "a1": a1, "a2": a2, "merged": export_once(tmp_path_factory, base, "merged", [a1]),
            "bank": export_once(tmp_path_factory, base, "bank", [a1, a2])}


def test_text_stream_emits_whole_characters_of_a_byte_level_tokenizer(llama):
    """Each multi-byte character spans several byte tokens: it comes out whole, once its last byte is in."""
    from ia3_export.runtime.generation import TextStream
    from ia3_export.runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(llama["base"])
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT)  # multi-byte characters are several tokens
    stream = TextStream(tok.decode)
    pieces = [stream.push(t) for t in ids] + [stream.finish()]
    emitted = [p for p in pieces if p]
    assert "".join(emitted) == TEXT
    assert emitted == list(TEXT)  # one piece per character, none with a replacement character
    assert pieces[1] == ""  # 'h' then the first byte of 'é': held back until its second byte
    assert pieces[2] == "é"


@pytest.mark.parametrize("options", [{}, {"do_sample": True, "seed": 3, "top_k": 40, "top_p": 0.9, "temperature": 0.8}])
def test_stream_joins_to_generate_and_comes_token_by_token(llama, options):
    from ia3_export.runtime import IA3Session

    s = IA3Session(llama["merged"])
    runs = []
    step_run = s.step_run

    def counted(*a, **k):  # count model runs (generation steps) as pieces arrive
        r = step_run(*a, **k)
        step = r.step
        r.step = lambda *x: runs.append(1) or step(*x)
        return r
    s.step_run = counted
    pieces, runs_at = [], []
    for piece in s.generate(TEXT, stream=True, max_new_tokens=24, **options):
        pieces.append(piece)
        runs_at.append(len(runs))
    s.step_run = step_run
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # a possibly incomplete character is held back
    assert "".join(pieces) == s.generate(TEXT, max_new_tokens=24, **options)
    assert runs_at[0] < runs_at[-1]  # the first piece came before the last model run, not at the end


def test_cli_generate_streams_the_same_text(llama):
    from ia3_export.runtime import IA3Session

    result = run_cli("generate", llama["merged"], "--prompt", TEXT, "--max-new-tokens", "12")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == IA3Session(llama["merged"]).generate(TEXT, max_new_tokens=12) + "\n"


def test_bank_batch_with_per_row_adapters_and_stop_strings_gives_each_adapters_peft_tokens(llama):
    """generate_batch on a bank export: one batch, each row its own adapter (PEFT's greedy tokens), and a
    stop string that ends one row leaves the other running."""
    from ia3_export.runtime import IA3Session
    from ia3_export.runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(llama["base"])
    s = IA3Session(llama["bank"])
    s.load_adapter(llama["a1"])
    s.load_adapter(llama["a2"])
    prompts = ["abc", "héllo there"]
    expected = [tok.decode(peft_greedy(llama["base"], llama[a], [tok.encode(p)], 10)[0])
                for a, p in zip(("a1", "a2"), prompts)]
    got = s.generate_batch([(prompts[0], "adapter1"), (prompts[1], "adapter2")], max_new_tokens=10)
    assert got == expected
    stop = next(c for c in expected[0][2:] if c not in expected[1])  # only row 0 produces it
    got = s.generate_batch([(prompts[0], "adapter1"), (prompts[1], "adapter2")], max_new_tokens=10,
                           stop_strings=[stop])
    assert got == [expected[0][:expected[0].index(stop) + 1], expected[1]]
