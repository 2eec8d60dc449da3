"""The sampling and penalty options vLLM and OpenAI users send (top_k, min_p, repetition_penalty,
presence_penalty, frequency_penalty, logit_bias, min_new_tokens, ignore_eos): each processor equals
transformers' own (or OpenAI's formula in float64), greedy decoding is the argmax of the processed
logits, generation equals transformers' `generate` on PEFT's model with the same options, and a
request with penalties gets the same tokens in the engine's batch as alone."""
from __future__ import annotations

import numpy as np
import pytest

from ia3_export.errors import IA3Error
from runtime_helpers import export_once, llama_exports, open_session, peft_model

VOCAB = 50
PROMPTS = [[1, 5, 5, 7], [3], [9, 9, 10, 11, 12]]  # each row's history before its first new token


def logits(seed: int, rows: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, (rows, VOCAB)).astype(np.float32)


def chooser_after(steps: int, prompts=PROMPTS, **options):
    """A chooser that has chosen `steps` tokens per row, token 3 the most likely at each (so it repeats):
    (it, each row's history: prompt + new tokens)."""
    from ia3_export.runtime.generation import GenerationOptions, TokenChooser

    chooser = TokenChooser(GenerationOptions(max_new_tokens=8, **options), prompts, eos={2, 7})
    history = [list(p) for p in prompts]
    for step in range(steps):
        x = logits(100 + step)
        x[:, 3] += 30
        for row, token in zip(history, chooser(x)):
            row.append(int(token))
    return chooser, history


def as_input_ids(history: list[list[int]]):
    """A [rows, length] tensor of each row's history, padded with its own first token (a repeat changes no
    penalty: transformers gathers and scatters per id)."""
    import torch

    width = max(len(h) for h in history)
    return torch.tensor([[h[0]] * (width - len(h)) + h for h in history])


def scores(x: np.ndarray):
    import torch

    return torch.from_numpy(x.astype(np.float64))


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_repetition_penalty_is_transformers(penalty):
    """Over the prompt and the new tokens: a logit < 0 multiplied, else divided (transformers' processor)."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    chooser, history = chooser_after(3, repetition_penalty=penalty)
    x = logits(7)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(as_input_ids(history), scores(x)).numpy()
    np.testing.assert_allclose(chooser.process(x), expected, rtol=0, atol=1e-12)
    assert not np.allclose(expected, x)


@pytest.mark.parametrize("presence, frequency", [(0.5, 0.0), (0.0, 0.8), (-1.2, 2.0)])
def test_presence_and_frequency_penalties_are_openais_formula_over_new_tokens(presence, frequency):
    """logit - frequency x count - presence x (count > 0), the count over the NEW tokens only (the prompt's
    tokens are not penalized: OpenAI's and vLLM's)."""
    chooser, history = chooser_after(4, presence_penalty=presence, frequency_penalty=frequency)
    counts = np.array([np.bincount(h[len(p):], minlength=VOCAB) for h, p in zip(history, PROMPTS)], np.float64)
    x = logits(8)
    expected = x.astype(np.float64) - frequency * counts - presence * (counts > 0)
    np.testing.assert_allclose(chooser.process(x), expected, rtol=0, atol=1e-12)
    assert (counts.max(-1) > 1).any()  # a repeat, so frequency counts more than presence


def test_min_new_tokens_is_transformers():
    """EOS (every id of the set) masked while fewer than min_new_tokens tokens are out, not after."""
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    from ia3_export.runtime.generation import GenerationOptions, TokenChooser

    prompt = [[4, 5, 6]]
    processor = MinNewTokensLengthLogitsProcessor(len(prompt[0]), 3, [2, 7])
    chooser = TokenChooser(GenerationOptions(max_new_tokens=8, min_new_tokens=3), prompt, eos={2, 7})
    history = list(prompt[0])
    for step in range(5):
        x = logits(step, rows=1)
        x[0, 2] = 50.0  # EOS the most likely: chosen only once allowed
        expected = processor(as_input_ids([history]), scores(x)).numpy()
        np.testing.assert_array_equal(chooser.process(x), expected)
        token = int(chooser(x)[0])
        history.append(token)
        assert (token == 2) == (step >= 3)


def test_logit_bias_is_transformers_sequence_bias():
    """OpenAI's logit_bias: the bias added to the token's logit (transformers' single-token sequence_bias)."""
    from transformers.generation.logits_process import SequenceBiasLogitsProcessor

    bias = {5: 3.5, 7: -100.0, 49: 0.25}
    chooser, history = chooser_after(0, logit_bias={str(k): v for k, v in bias.items()})  # JSON's string keys too
    x = logits(9)
    expected = SequenceBiasLogitsProcessor([[[k], v] for k, v in bias.items()])(as_input_ids(history), scores(x))
    np.testing.assert_allclose(chooser.process(x), expected.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [(1.0, 0, 1.0, 0.1), (0.7, 20, 0.9, 0.05),
                                                               (1.3, 5, 1.0, 0.3), (2.0, 0, 0.8, 0.0)])
def test_the_whole_chain_is_transformers_processors_then_warpers(temperature, top_k, top_p, min_p):
    """logit_bias, min_new_tokens, repetition, then OpenAI's penalties; then temperature, top-k, top-p and
    min-p (transformers' TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper) for the sampling distribution."""
    from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor, MinPLogitsWarper,
                                                        RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    import torch

    chooser, history = chooser_after(2, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3,
                                     logit_bias={5: 2.0, 11: -3.0}, min_new_tokens=4, do_sample=True, seed=0,
                                     temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    x = logits(10)
    ids = as_input_ids(history)
    processors = [SequenceBiasLogitsProcessor([[[5], 2.0], [[11], -3.0]]), RepetitionPenaltyLogitsProcessor(1.3),
                  MinNewTokensLengthLogitsProcessor(ids.shape[1] - 2, 4, [2, 7])]
    expected = scores(x)
    for p in processors:
        expected = p(ids, expected)
    counts = torch.tensor(np.array([np.bincount(h[len(p):], minlength=VOCAB) for h, p in zip(history, PROMPTS)]),
                          dtype=torch.float64)
    expected = expected - 0.3 * counts - 0.4 * (counts > 0).double()
    np.testing.assert_allclose(chooser.process(x), expected.numpy(), rtol=0, atol=1e-12)
    warpers = [TemperatureLogitsWarper(temperature), *([TopKLogitsWarper(top_k)] if top_k else []),
               *([TopPLogitsWarper(top_p)] if top_p < 1 else []), *([MinPLogitsWarper(min_p)] if min_p else [])]
    for w in warpers:
        expected = w(ids, expected)
    np.testing.assert_allclose(chooser.probabilities(x), torch.softmax(expected, -1).numpy(), atol=1e-12)


def test_greedy_is_the_argmax_of_the_processed_logits():
    """As transformers: the processors apply to greedy decoding too (the raw argmax is not the answer)."""
    x = logits(11)
    top = x.argmax(-1)
    chooser, _ = chooser_after(0, logit_bias={int(t): -100 for t in top})
    assert not chooser.plain
    chosen = chooser(x)
    assert (chosen != top).all() and (chosen == np.argsort(-x, -1)[:, 1]).all()
    plain, _ = chooser_after(0)
    assert plain.plain and (plain(x) == top).all()


@pytest.mark.parametrize("options, message", [
    ({"min_p": 1.5}, "min_p must be a number from 0 to 1"),
    ({"min_p": float("nan")}, "min_p must be a number from 0 to 1"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a finite number > 0"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number > 0"),
    ({"presence_penalty": 2.5}, "presence_penalty must be a number from -2 to 2"),
    ({"frequency_penalty": -3}, "frequency_penalty must be a number from -2 to 2"),
    ({"frequency_penalty": "1"}, "frequency_penalty must be a number from -2 to 2"),
    ({"min_new_tokens": 9}, r"min_new_tokens must be an integer from 0 to max_new_tokens \(8\)"),
    ({"min_new_tokens": -1}, "min_new_tokens must be an integer from 0"),
    ({"ignore_eos": 1}, "ignore_eos must be True or False"),
    ({"logit_bias": {"5": 101}}, "logit_bias must map token ids"),
    ({"logit_bias": {"x": 1}}, "logit_bias must map token ids"),
    ({"logit_bias": {-1: 1}}, "logit_bias must map token ids"),
    ({"logit_bias": [5, 1]}, "logit_bias must map token ids"),
    ({"logit_bias": {i: 1 for i in range(301)}}, "logit_bias names 301 tokens, more than the 300"),
])
def test_bad_processor_options_are_one_line_errors_naming_the_field(options, message):
    from ia3_export.runtime import GenerationOptions

    with pytest.raises(IA3Error, match=message) as caught:
        GenerationOptions(max_new_tokens=8, **options)
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, model_dir, adapter_dir):
    return llama_exports(tmp_path_factory, model_dir, adapter_dir, modes=("bank",))


def ours(s, prompt, adapter, **options) -> list[int]:
    from ia3_export.runtime import GenerationOptions, generate_ids

    return generate_ids(s, [prompt], [adapter], GenerationOptions(**options), s.tokenizer().decode)[0]


def transformers_generate(model, prompt, eos: list[int], **options) -> list[int]:
    """transformers' greedy generate (no padding), new tokens only, cut after the first EOS."""
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones_like(torch.tensor([prompt])),
                             do_sample=False, pad_token_id=0, eos_token_id=eos, **options)
    new = out[0, 1:].tolist() if model.config.is_encoder_decoder else out[0, len(prompt):].tolist()
    return next((new[:i + 1] for i, t in enumerate(new) if t in eos), new)


def test_generation_with_penalties_and_min_new_tokens_equals_transformers_on_peft(llama):
    """Greedy generation with repetition_penalty and min_new_tokens on the exported llama with an adapter
    equals transformers' `generate` on PEFT's model with the same options, and each option changes the tokens."""
    s = open_session(llama["bank"], llama["a1"])
    model = peft_model(llama["base"], llama["a1"])
    prompt = [5, 6, 7, 8, 9, 10, 5, 6]
    plain = ours(s, prompt, "adapter1", max_new_tokens=16, eos_token_ids=[])
    eos = plain[2]  # a token it stops at early without min_new_tokens
    got = {}
    for options in ({"repetition_penalty": 1.6}, {"repetition_penalty": 0.6}, {"min_new_tokens": 9},
                    {"repetition_penalty": 1.6, "min_new_tokens": 9}, {"repetition_penalty": 0.6, "min_new_tokens": 9}):
        tokens = got[tuple(options.items())] = ours(s, prompt, "adapter1", max_new_tokens=16, eos_token_ids=[eos],
                                                    **options)
        assert tokens == transformers_generate(model, prompt, [eos], max_new_tokens=16, **options), options
        if "min_new_tokens" in options:
            assert eos not in tokens[:9] and len(tokens) > 3
    # with EOS masked this run repeats itself, and each penalty changes it
    masked = got[("min_new_tokens", 9),]
    assert len(set(masked)) < len(masked)
    assert got[("repetition_penalty", 1.6), ("min_new_tokens", 9)] != masked
    assert got[("repetition_penalty", 0.6), ("min_new_tokens", 9)] != masked


def test_seq2seq_penalties_read_the_decoder_history_as_transformers(tmp_path_factory, model_dir):
    """A T5's repetition penalty covers its decoder's tokens (the start token and the new ones), not the
    encoder's prompt: transformers' generate."""
    from ia3_export.runtime import IA3Session

    base = model_dir("t5")
    s = IA3Session(export_once(tmp_path_factory, base, "merged", []))
    model = peft_model(base, None)
    prompt = [5, 6, 7, 8, 9]
    for options in ({"repetition_penalty": 1.8}, {"repetition_penalty": 1.8, "min_new_tokens": 5}):
        eos = s.folder.eos_ids()
        got = ours(s, prompt, None, max_new_tokens=12, **options)
        assert got == transformers_generate(model, prompt, sorted(eos), max_new_tokens=12, **options), options


def test_ignore_eos_runs_to_max_new_tokens_and_stop_strings_wait_for_min_new_tokens(llama):
    """ignore_eos: EOS is emitted and generation goes on; a stop string written before min_new_tokens does
    not end the row then, nor later (vLLM's: only a stop string ending in the new text counts)."""
    s = open_session(llama["bank"], llama["a1"])
    prompt = [5, 6, 7, 8, 9, 10]
    plain = ours(s, prompt, "adapter1", max_new_tokens=12, eos_token_ids=[])
    eos = plain[2]
    assert ours(s, prompt, "adapter1", max_new_tokens=12, eos_token_ids=[eos], ignore_eos=True) == plain
    text = s.tokenizer().decode
    n = next(n for n in range(1, 13) if text(plain[:n]))
    first = text(plain[:n])[-1]  # a stop string the n-th token writes (the first that writes any text)
    assert ours(s, prompt, "adapter1", max_new_tokens=12, eos_token_ids=[], stop_strings=[first]) == plain[:n]
    late = ours(s, prompt, "adapter1", max_new_tokens=12, eos_token_ids=[], stop_strings=[first], min_new_tokens=n + 2)
    assert late == plain[:len(late)] and len(late) >= n + 2


def test_a_stop_string_counts_where_it_ends_in_the_new_text():
    """vLLM's rule: before min_new_tokens nothing ends a row, and a stop string written then does not end it
    later; one that ends in a later token's text does, even across a character a token completes."""
    from ia3_export.runtime.generation import GenerationOptions, RowStop

    # 9: EOS; 4 then 5: an incomplete character, then its completion
    letters = {0: "a", 1: "b", 2: "c", 3: "d", 4: "\ufffd", 5: "é", 9: "z"}

    def decode(ids):
        text = "".join(letters[i] for i in ids)
        return text.replace("\ufffdé", "é")

    def stops_at(tokens, **options):
        stop = RowStop({9}, GenerationOptions(max_new_tokens=10, **options), decode)
        return next((n + 1 for n, t in enumerate(tokens) if stop(t)), None)

    assert stops_at([0, 1, 2, 3, 1], stop_strings=["b"]) == 2
    assert stops_at([0, 1, 2, 3, 1], stop_strings=["b"], min_new_tokens=3) == 5  # the early "b" does not count
    assert stops_at([0, 1, 2, 3], stop_strings=["b"], min_new_tokens=3) is None
    assert stops_at([0, 4, 5], stop_strings=["aé"]) == 3
    assert stops_at([0, 9, 1], stop_strings=["zz"]) == 2
    assert stops_at([0, 9, 1], stop_strings=["zz"], min_new_tokens=3) is None  # EOS early: not the end
    assert stops_at([0, 9, 1, 9], stop_strings=["zz"], ignore_eos=True) is None


def test_a_request_with_penalties_gets_its_tokens_alone_in_the_engines_batch(llama):
    """Rows with processors choose through their own history; joining a batch mid-generation (plain rows
    around it, one batched argmax) changes none of its tokens, nor theirs."""
    from ia3_export.runtime import Engine, GenerationOptions, Request

    s = open_session(llama["bank"], llama["a1"], llama["a2"])
    processed = dict(repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.7, logit_bias={6: 1.5},
                     min_new_tokens=3)
    sampled = dict(do_sample=True, seed=4, temperature=0.9, top_k=10, min_p=0.05, **processed)
    arrivals = {0: [([5, 6, 7, 8, 9, 10], "adapter1", {}), ([11, 12, 13], "adapter2", processed)],
                2: [([5, 6, 7, 8, 9, 10], "adapter1", processed), ([40, 41], None, {})],
                3: [([20, 21, 22], "adapter2", sampled)]}
    engine, handles, step = Engine(s), [], 0
    while True:
        handles += [engine.submit(Request(p, a, GenerationOptions(max_new_tokens=14, **o))) for p, a, o in
                    arrivals.get(step, [])]
        step += 1
        if not engine.step() and step > max(arrivals):
            break
    requests = [r for i in sorted(arrivals) for r in arrivals[i]]
    tokens = [h.result(0).tokens for h in handles]
    assert tokens == [ours(s, p, a, max_new_tokens=14, **o) for p, a, o in requests]
    assert tokens[2] != ours(s, [5, 6, 7, 8, 9, 10], "adapter1", max_new_tokens=14)  # the options mattered


def test_a_logit_bias_past_the_vocabulary_is_refused_before_any_work(llama):
    from ia3_export.runtime import Engine, GenerationOptions, Request

    s = open_session(llama["bank"], llama["a1"])
    vocab = s.folder.config["vocab_size"]
    with pytest.raises(IA3Error, match=f"logit_bias names token {vocab}, outside the vocabulary of {vocab} tokens"):
        ours(s, [5, 6], None, logit_bias={vocab: 1})
    with pytest.raises(IA3Error, match=f"logit_bias names token {vocab}, outside the vocabulary"):
        Engine(s).submit(Request([5, 6], None, GenerationOptions(logit_bias={vocab: 1})))
