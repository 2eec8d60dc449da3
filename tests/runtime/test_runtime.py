"""The runtime against independent references: PEFT/transformers logits and greedy generation,
ONNX Runtime's own adapter API, and per-row runs for bank batches (fp32, CPU)."""
from __future__ import annotations


import numpy as np
import pytest

from ia3_export.compare import compare
from ia3_export.errors import IA3Error
from runtime_helpers import PROMPTS, export_once, open_session, padded, peft_greedy, peft_logits, prefill_feeds

ATOL = 1e-4


@pytest.fixture(scope="module")
def llama(tmp_path_factory, model_dir, adapter_dir):
    """A tiny llama, two PEFT adapters, and its swappable, bank and merged (adapter 1) exports."""
    base = model_dir("llama")
    a1, a2 = adapter_dir("llama", seed=1), adapter_dir("llama", seed=2)
    return {
        "base": base, "a1": a1, "a2": a2,
        **{mode: export_once(tmp_path_factory, base, mode, [a1, a2] if mode != "merged" else [a1])
           for mode in ("swappable", "bank", "merged")},
    }


def assert_close(name, reference, actual, mask):
    result = compare(name, reference[mask.astype(bool)], actual[mask.astype(bool)], atol=ATOL, rtol=ATOL)
    assert result.passed, result.line()


@pytest.mark.parametrize("mode", ["swappable", "bank"])
def test_logits_match_peft_per_adapter_and_switch_back(llama, mode):
    s = open_session(llama[mode], llama["a1"], llama["a2"])
    ids, mask = padded()
    feeds = prefill_feeds(s, ids, mask)
    references = {name: peft_logits(llama["base"], llama[name] if name else None, ids, mask) for name in (None, "a1", "a2")}
    for name in ("adapter1", None, "adapter2", None):  # switching back to no adapter restores the base model
        s.set_adapter(name)
        key = {"adapter1": "a1", "adapter2": "a2", None: None}[name]
        assert_close(f"{mode} {name}", references[key], s.run(feeds)["logits"], mask)


def test_merged_folder_matches_peft_and_takes_no_adapters(llama):
    s = open_session(llama["merged"])
    ids, mask = padded()
    assert_close("merged", peft_logits(llama["base"], llama["a1"], ids, mask), s.run(prefill_feeds(s, ids, mask))["logits"], mask)
    with pytest.raises(IA3Error, match="merged export"):
        s.load_adapter(llama["a2"])


@pytest.mark.parametrize("past", [0, 3])
def test_bank_mixed_batch_equals_per_row_runs(llama, past):
    s = open_session(llama["bank"], llama["a1"], llama["a2"])
    rng = np.random.default_rng(0)
    names = ["adapter1", "adapter2", None]
    ids = rng.integers(3, 300, (3, 4))
    mask = np.ones((3, past + 4), np.int64)
    feeds = prefill_feeds(s, ids, mask[:, past:])
    feeds["attention_mask"] = mask
    feeds["position_ids"] = np.tile(np.arange(past, past + 4), (3, 1))
    for name in [n for n in feeds if n.startswith("past_key_values")]:
        shape = list(feeds[name].shape)
        shape[2] = past
        feeds[name] = rng.standard_normal(shape).astype(np.float32)
    mixed = s.run(feeds, adapters=names)
    for row, name in enumerate(names):
        alone = s.run(feeds, adapters=[name] * 3)
        for out in ("logits", "present.1.value"):
            result = compare(f"row {row} {out}", alone[out][row], mixed[out][row], atol=1e-6, rtol=1e-6)
            assert result.passed, result.line()


def test_bank_rows_follow_loading_and_unloading(llama):
    s = open_session(llama["bank"], llama["a1"], llama["a2"])
    ids, mask = padded()
    feeds = prefill_feeds(s, ids, mask)
    before = s.run(feeds, adapters=["adapter2", "adapter2"])["logits"]
    s.unload_adapter("adapter1")  # adapter2 moves to row 1 of rebuilt banks
    np.testing.assert_array_equal(s.adapter_rows(["adapter2", None]), [1, 0])
    np.testing.assert_allclose(s.run(feeds, adapters=["adapter2", "adapter2"])["logits"], before, atol=1e-6, rtol=0)
    with pytest.raises(IA3Error, match="not loaded"):
        s.run(feeds, adapters=["adapter1", "adapter2"])


def test_shipped_adapter_equals_peft_folder(llama):
    s = open_session(llama["swappable"])
    assert s.load_shipped_adapters() == ["adapter1", "adapter2"]
    ids, mask = padded()
    feeds = prefill_feeds(s, ids, mask)
    s.set_adapter("adapter2")
    shipped = s.run(feeds)["logits"]
    s.load_adapter(llama["a2"], name="from_peft")
    s.set_adapter("from_peft")
    np.testing.assert_array_equal(shipped, s.run(feeds)["logits"])


@pytest.mark.parametrize("mode", ["swappable", "bank"])
def test_greedy_generation_matches_transformers_per_adapter(llama, mode):
    from ia3_export.runtime import GenerationOptions, generate_ids

    s = open_session(llama[mode], llama["a1"], llama["a2"])
    options = GenerationOptions(max_new_tokens=8)
    if mode == "bank":  # one batch, a different adapter per row, left-padded
        got = generate_ids(s, PROMPTS, ["adapter1", "adapter2"], options)
        want = [peft_greedy(llama["base"], llama["a1"], PROMPTS[:1], 8)[0], peft_greedy(llama["base"], llama["a2"], PROMPTS[1:], 8)[0]]
    else:
        got = generate_ids(s, PROMPTS, ["adapter2"] * 2, options)
        want = peft_greedy(llama["base"], llama["a2"], PROMPTS, 8)
    assert got == want


def test_generation_stops_at_eos_and_samples_reproducibly(llama):
    from ia3_export.runtime import GenerationOptions, generate_ids

    s = open_session(llama["swappable"], llama["a1"])
    greedy = generate_ids(s, PROMPTS, None, GenerationOptions(max_new_tokens=6))
    tiny_nucleus = generate_ids(s, PROMPTS, None, GenerationOptions(max_new_tokens=6, do_sample=True, top_p=1e-9, seed=1))
    assert tiny_nucleus == greedy  # a nucleus of one token is the argmax
    sampled = [generate_ids(s, PROMPTS, None, GenerationOptions(max_new_tokens=6, do_sample=True, temperature=5.0, seed=3))
               for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0] != greedy
    eos = greedy[0][1]  # make the second token of row 0 the EOS: row 0 stops there, row 1 where it meets it
    cut = generate_ids(s, PROMPTS, None, GenerationOptions(max_new_tokens=6, eos_token_ids=[eos]))
    assert cut == [row[:row.index(eos) + 1] if eos in row else row for row in greedy]


def test_generate_batch_text_and_grouping(llama):
    s = open_session(llama["swappable"], llama["a1"], llama["a2"])
    texts = s.generate_batch([("hello", "adapter1"), ("hi", "adapter2"), ("hey", "adapter1")], max_new_tokens=4)
    singles = [s.generate(p, adapter=a, max_new_tokens=4) for p, a in [("hello", "adapter1"), ("hi", "adapter2"), ("hey", "adapter1")]]
    assert texts == singles
    with pytest.raises(IA3Error, match="one adapter per batch"):
        s.run({"input_ids": np.zeros((2, 1), np.int64)}, adapters=["adapter1", "adapter2"])


@pytest.mark.parametrize("mode", ["swappable", "bank"])
def test_generate_uses_the_active_adapter_unless_told_otherwise(llama, mode):
    from ia3_export.runtime.tokenizer import TextTokenizer

    s = open_session(llama[mode], llama["a1"])
    tok = TextTokenizer(llama[mode])
    prompt = "the cat sat on"
    want_adapter = tok.decode(peft_greedy(llama["base"], llama["a1"], [tok.encode(prompt)], 6)[0])
    want_base = tok.decode(peft_greedy(llama["base"], None, [tok.encode(prompt)], 6)[0])
    assert s.generate(prompt, max_new_tokens=6) == want_base  # nothing active yet
    s.set_adapter("adapter1")
    assert s.generate(prompt, max_new_tokens=6) == want_adapter
    assert s.generate(prompt, adapter=None, max_new_tokens=6) == want_base  # None: the base model, explicitly
    assert want_adapter != want_base


def test_adapter_mismatches_and_names_are_refused(llama, adapter_dir, tmp_path):
    from ia3_export.formats.onnx_adapter import write_onnx_adapter
    from ia3_export.runtime.adapters import check_name

    s = open_session(llama["swappable"])
    other_targets = adapter_dir("llama", seed=3, target_modules=("q_proj", "v_proj"), feedforward_modules=())
    with pytest.raises(IA3Error, match=r"q_proj\.ia3_l is not a vector input .* other target_modules"):
        s.load_adapter(other_targets)
    wrong = str(tmp_path / "wrong.onnx_adapter")
    write_onnx_adapter(wrong, {"model.layers.0.self_attn.k_proj.ia3_l": np.ones(7, np.float32)})
    with pytest.raises(IA3Error, match="expects 16 values"):
        s.load_adapter(wrong)
    for bad in ("../x", "a/b", "..", ".hidden", "x\\y", ""):
        with pytest.raises(IA3Error, match="not allowed"):
            check_name(bad)
    with pytest.raises(IA3Error, match="not allowed"):
        s.load_adapter(llama["a1"], name="../../escape")
    with pytest.raises(IA3Error, match="neither a PEFT folder"):
        s.load_adapter("adapter9")
    s.folder.manifest["adapters"].append({"name": "evil", "file": "../../../etc/passwd"})
    with pytest.raises(IA3Error, match="outside the folder"):
        s.load_adapter("evil")


def test_a_model_without_positions_still_bounds_its_prompt(tmp_path_factory, model_dir):
    """T5 names no position limit, so nothing bounded a prompt: one of 250,000 tokens (what 1 MiB of text
    makes) would have the encoder attend over it squared and take the server with it. At most
    Limits.max_prompt_tokens (4096) now, checked for the session's generate and engine (new_token_budget)
    and per row by the server (Served.parse_prompt), so one such request fails alone."""
    from ia3_export.runtime import GenerationOptions, IA3Session, generate_ids
    from ia3_export.runtime.requests import Limits
    from ia3_export.serve.models import Row, Served

    folder = export_once(tmp_path_factory, model_dir("t5"), "merged", [])
    session = IA3Session(folder)
    assert session.folder.max_positions is None
    with pytest.raises(IA3Error, match="the prompt has 4097 tokens; this model names no position limit"):
        generate_ids(session, [[5] * 4097], [None], GenerationOptions(max_new_tokens=2))
    small = IA3Session(folder, limits=Limits(max_prompt_tokens=8))
    assert len(generate_ids(small, [[5] * 8], [None], GenerationOptions(max_new_tokens=2))[0]) == 2
    with pytest.raises(IA3Error, match="at most 8 \\(Limits.max_prompt_tokens\\)"):
        generate_ids(small, [[5] * 9], [None], GenerationOptions(max_new_tokens=2))
    served, row = Served(small), Row()
    with pytest.raises(IA3Error, match="the prompt has 9 tokens"):
        served.parse_prompt(row, {"input_ids": np.full((1, 9), 5)}, reserve=2)
    served.parse_prompt(row, {"input_ids": np.array([[5, 6, -1]]), "adapter": np.array([[b""]])}, reserve=2)
    assert row.ids == [5, 6]


def test_a_huge_name_is_quoted_short_in_every_error(llama):
    """A client's 10,000-character adapter name once came back whole in the error (an HTTP body, a log
    line): each place that quotes it clips it, and every IA3Error is capped where it is made."""
    from ia3_export.errors import MAX_MESSAGE
    from ia3_export.runtime.adapters import check_name

    s, huge = open_session(llama["swappable"]), "x" * 10_000
    for call in (lambda: check_name(huge), lambda: s.load_adapter(huge), lambda: s.set_adapter(huge),
                 lambda: s.load_adapter(llama["a1"], name=huge + "/")):
        with pytest.raises(IA3Error) as caught:
            call()
        assert len(str(caught.value)) < 400 and "(10,00" in str(caught.value), str(caught.value)[:500]
    long = IA3Error("what is wrong: " + "y" * 50_000 + " the fix")
    assert len(str(long)) <= MAX_MESSAGE and str(long).startswith("what is wrong") and str(long).endswith("the fix")


def test_seq2seq_greedy_generation_matches_transformers(tmp_path_factory, model_dir, adapter_dir):
    from ia3_export.runtime import GenerationOptions, generate_ids

    base, a1 = model_dir("t5"), adapter_dir("t5", seed=1)
    s = open_session(export_once(tmp_path_factory, base, "swappable", [a1]), a1)
    prompts = [[5, 6, 7, 8, 9, 2], [11, 12, 2]]  # right-padded into one encoder batch
    assert generate_ids(s, prompts, ["adapter1"] * 2, GenerationOptions(max_new_tokens=6)) == peft_greedy(base, a1, prompts, 6)


def test_generate_command(llama):

    from cli_helpers import run_cli

    run = lambda *args: run_cli("generate", *args)  # noqa: E731
    result = run(llama["bank"], "--adapter", "adapter2", "--prompt", "hello", "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    assert result.output == open_session(llama["bank"], llama["a2"]).generate("hello", adapter="adapter2", max_new_tokens=5) + "\n"
    result = run(llama["merged"], "--adapter", llama["a2"], "--prompt", "hello")
    assert result.exit_code == 2 and "merged export" in result.output
