"""Generation options are checked as bad usage (exit 2, one line) in the API and the CLI, a run never
goes past the model's positions, and top-k / top-p / stop strings follow transformers' semantics."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run_cli
from ia3_export.errors import IA3Error
from runtime_helpers import export_once

MAX_POSITIONS = 128  # the tiny models' max_position_embeddings / n_positions


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, model_dir):
    """A tiny GPT-2 (learned positions: a run past them is an index error) and its merged export."""
    base = model_dir("gpt2")
    return base, export_once(tmp_path_factory, base, "merged", [])


@pytest.mark.parametrize("args, message", [
    (["--sample", "--temperature", "nan"], "--temperature is nan; give a finite number in the range x>0"),
    (["--sample", "--temperature", "inf"], "--temperature is inf; give a finite number in the range x>0"),
    (["--sample", "--temperature", "0"], "--temperature is 0.0; give a finite number in the range x>0"),
    (["--top-p", "nan"], "--top-p is nan; give a finite number in the range 0<x<=1"),
    (["--top-p", "0"], "--top-p is 0.0; give a finite number in the range 0<x<=1"),
    (["--top-k", "-1"], "--top-k is -1; give a whole number in the range 0<=x<=2147483647"),
    (["--max-new-tokens", "0"], "--max-new-tokens is 0; give a whole number in the range 1<=x<=2147483647"),
    ([a for i in range(65) for a in ("--stop", f"s{i}")], "65 stop strings, more than the 64 a request may hold"),
])
def test_cli_bad_generation_options_are_one_line_usage_errors(gpt2, args, message):
    assert_one_line_error(run_cli("generate", gpt2[1], "--prompt", "hi", *args), 2, message)


@pytest.mark.parametrize("options", [
    {"do_sample": True, "temperature": math.nan}, {"temperature": -1.0}, {"top_k": 2.5}, {"top_k": True},
    {"top_p": 1.5}, {"max_new_tokens": 3.0}, {"seed": "1"}, {"stop_strings": [""]}, {"stop_strings": 5},
    {"stop_strings": ["x"] * 65},
])
def test_api_bad_generation_options_raise_ia3error(gpt2, options):
    from ia3_export.runtime import IA3Session

    with pytest.raises(IA3Error):
        IA3Session(gpt2[1]).generate("hi", **options)


def test_max_new_tokens_is_cut_to_the_positions_left_and_matches_transformers(gpt2):
    """`--max-new-tokens 1000000000` used to run for ever; now it stops at the model's positions, says so,
    and generates transformers' greedy tokens for the whole context."""
    import torch
    from transformers import AutoModelForCausalLM

    from ia3_export.runtime.tokenizer import TextTokenizer

    base, folder = gpt2
    prompt = "héllo"
    result = run_cli("generate", folder, "--prompt", prompt, "--max-new-tokens", "1000000000", timeout=120)
    assert result.exit_code == 0, result.stderr
    ids = TextTokenizer(base).encode(prompt)
    left = MAX_POSITIONS - len(ids)
    assert f"note: max_new_tokens 1000000000 cut to {left}" in result.stderr
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=left, do_sample=False, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    assert result.stdout.rstrip("\n") == TextTokenizer(base).decode(new)


def test_prompt_longer_than_the_positions_names_its_length_and_the_limit(gpt2):
    result = run_cli("generate", gpt2[1], "--prompt", "a" * 200)
    assert_one_line_error(result, 2, "the prompt has 200 tokens; the model takes at most 128 positions")


def test_api_caps_max_new_tokens_with_a_warning(gpt2):
    from ia3_export.runtime import GenerationOptions, IA3Session, generate_ids
    from ia3_export.runtime.generation import GenerationCapped

    s = IA3Session(gpt2[1])
    with pytest.warns(GenerationCapped, match="cut to 28"):
        out = generate_ids(s, [list(range(5, 105))], None, GenerationOptions(max_new_tokens=10_000, eos_token_ids=[]))
    assert len(out[0]) == 28
    with pytest.raises(IA3Error, match="the prompt has 128 tokens"):
        generate_ids(s, [[5] * MAX_POSITIONS], None, GenerationOptions())


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 5, 1.0), (0.7, 20, 0.9), (1.3, 0, 0.5), (2.0, 1, 1.0)])
def test_sampling_distribution_is_transformers_warpers(temperature, top_k, top_p):
    """Temperature, then top-k, then top-p, as transformers' logits warpers compute them."""
    import torch
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    from ia3_export.runtime.generation import GenerationOptions, TokenChooser

    logits = np.random.default_rng(0).normal(0, 3, (3, 50)).astype(np.float32)
    scores = torch.from_numpy(logits.astype(np.float64))
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    for w in warpers:
        scores = w(None, scores)
    expected = torch.softmax(scores, -1).numpy()
    chooser = TokenChooser(GenerationOptions(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p))
    np.testing.assert_allclose(chooser.probabilities(logits), expected, atol=1e-12)
    if top_k:
        allowed = np.argsort(-logits, -1)[:, :top_k]
        for _ in range(20):
            assert all(t in row for t, row in zip(chooser(logits), allowed))


def test_stop_strings_stop_where_transformers_does(model_dir):
    """A row ends with the token that completes a stop string (kept), as transformers' stop_strings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ia3_export.runtime import IA3Session

    base = model_dir("llama")
    s = IA3Session(export_once_plain(base))
    prompt = "The cat"
    full = s.generate(prompt, max_new_tokens=30)
    # a visible ASCII character from the middle (transformers maps byte-level tokens back to text only for those)
    stop = next(c for c in full[3:] if 33 <= ord(c) < 127)
    tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=30, do_sample=False, stop_strings=[stop], tokenizer=tokenizer,
                             pad_token_id=0)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    got = s.generate(prompt, max_new_tokens=30, stop_strings=[stop])
    assert got == expected and got.endswith(stop) and len(got) < len(full)


_PLAIN: dict = {}


def export_once_plain(base):
    """A merged export of the base model, once per test session (no adapter)."""
    import tempfile

    from ia3_export.export import export_model

    if base not in _PLAIN:
        _PLAIN[base] = tempfile.mkdtemp() + "/onnx"
        export_model(base, _PLAIN[base], mode="merged")
    return _PLAIN[base]
