"""The sampling and penalty parameters vLLM users send (top_k, min_p, repetition_penalty, presence_penalty,
frequency_penalty, logit_bias, min_tokens, ignore_eos), end to end: through the OpenAI front with the
`openai` client (vLLM's fields in `extra_body`) and through Triton's generate and generate_stream (the
engine, and Triton's whole-request batching), each answer equals `IA3Session`'s with the same options, and
a bad value is a 400 (or the model's error) naming the field."""
from __future__ import annotations

import pytest
from conftest import concurrently
from test_continuous import post_openai, streamed
from test_generate import A1, A2

from ia3_export.serve import ServeClient, ServeError

PROMPT = "the cat "
PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.75, "repetition_penalty": 1.5}


def eos(ref) -> int:
    return min(ref.session.folder.eos_ids())


def test_completions_with_every_parameter_equal_the_session(continuous, reference):
    """Greedy with penalties and logit_bias, EOS pushed up by logit_bias then held off by min_tokens (or
    ignored), and sampled with top_k and min_p and a seed: each completion is the session's own tokens."""
    import openai

    ref = reference("llama-bank")
    client = openai.OpenAI(base_url=continuous.openai, api_key="unused")
    ids, end = ref.encode(PROMPT), eos(ref)
    plain = ref.generate(ids, A1, 12)
    cases = [  # (the OpenAI request's parameters, GenerationOptions's, the finish reason)
        ({"logit_bias": {str(plain[0]): 4}, "presence_penalty": 0.5, "frequency_penalty": 0.75,
          "extra_body": {"repetition_penalty": 1.5, "top_k": 5}},
         {"logit_bias": {plain[0]: 4.0}, "top_k": 5, **PENALTIES}, "length"),
        ({"logit_bias": {str(end): 100}, "extra_body": {"min_tokens": 5}},
         {"logit_bias": {end: 100.0}, "min_new_tokens": 5}, "stop"),
        ({"logit_bias": {str(end): 100}, "extra_body": {"min_tokens": 5, "ignore_eos": True}},
         {"logit_bias": {end: 100.0}, "min_new_tokens": 5, "ignore_eos": True}, "length"),
        ({"temperature": 0.75, "seed": 3, "top_p": 0.875, "frequency_penalty": 0.5,
          "extra_body": {"top_k": 20, "min_p": 0.0625}},
         {"do_sample": True, "temperature": 0.75, "seed": 3, "top_p": 0.875, "top_k": 20, "min_p": 0.0625,
          "frequency_penalty": 0.5}, "length"),
    ]
    for sent, options, reason in cases:
        expected = ref.generate(ids, A1, 12, **options)
        done = client.completions.create(model=A1, prompt=PROMPT, max_tokens=12, **sent)
        assert done.choices[0].text == ref.decode(expected), sent
        assert (done.usage.completion_tokens, done.choices[0].finish_reason) == (len(expected), reason), sent
        pieces = client.completions.create(model=A1, prompt=PROMPT, max_tokens=12, stream=True, **sent)
        assert "".join(c.choices[0].text for c in pieces) == ref.decode(expected), sent
        if "temperature" not in sent:
            assert expected != plain  # the parameters changed the answer
    assert len(ref.generate(ids, A1, 12, logit_bias={end: 100.0}, min_new_tokens=5)) == 6  # EOS right after 5


def test_chat_takes_them_too(continuous, reference):
    import openai

    ref = reference("llama-bank")
    client = openai.OpenAI(base_url=continuous.openai, api_key="unused")
    prompt = ref.session.tokenizer().encode("<s><|user|>\nhi</s>\n<|assistant|>\n")
    expected = ref.generate(prompt, A2, 10, logit_bias={eos(ref): 100.0}, min_new_tokens=4, **PENALTIES)
    chat = client.chat.completions.create(model=A2, messages=[{"role": "user", "content": "hi"}], max_tokens=10,
                                          presence_penalty=0.5, frequency_penalty=0.75,
                                          logit_bias={str(eos(ref)): 100},
                                          extra_body={"repetition_penalty": 1.5, "min_tokens": 4})
    assert chat.choices[0].message.content == ref.decode(expected)
    assert chat.usage.completion_tokens == len(expected) == 5


def test_tritons_generate_models_take_them_as_inputs(continuous, reference):
    """generate (joining the engine's batch, with plain requests beside it) and generate_stream."""
    ref = reference("llama-bank")
    options = {"logit_bias": {13: 2.5}, "min_new_tokens": 3, "top_k": 4, **PENALTIES}
    expected = ref.generate([5, 6, 7], A1, 14, **options)
    requests = [dict(input_ids=[5, 6, 7], adapter=A1, max_new_tokens=14, **options),
                dict(input_ids=[5, 6, 8], adapter=A2, max_new_tokens=14)] * 2
    answers = concurrently([lambda r=r: ServeClient(continuous.url).generate(**r) for r in requests])
    assert [a.outputs["output_ids"] for a in answers] == [expected, ref.generate([5, 6, 8], A2, 14)] * 2
    assert streamed(continuous.url, input_ids=[5, 6, 7], adapter=A1, max_new_tokens=14, **options)[0] == expected
    assert expected != ref.generate([5, 6, 7], A1, 14)
    with pytest.raises(ServeError, match="presence_penalty must be a number from -2 to 2"):
        ServeClient(continuous.url).generate(input_ids=[5, 6], adapter=A1, max_new_tokens=3, presence_penalty=2.5)
    with pytest.raises(ServeError, match="logit_bias names token 100000, outside the vocabulary"):
        list(ServeClient(continuous.url).stream(input_ids=[5, 6], adapter=A1, max_new_tokens=3,
                                                logit_bias={100000: 1}))


def test_whole_request_batching_runs_a_row_with_processors_alone(llama_bank, reference):
    """`--batching request`: Triton batches requests that send the same inputs, and its batch runs one
    GenerationOptions, so a row whose options process the logits runs by itself while rows whose values
    are "off" still share a batch; every answer equals the session's."""
    ref = reference("llama-bank")
    off = {"repetition_penalty": 1.0, "logit_bias": {}, "min_new_tokens": 0, "ignore_eos": False}
    on = [{"repetition_penalty": 1.5, "logit_bias": {13: 5.0}, "min_new_tokens": 2, "ignore_eos": True},
          {"repetition_penalty": 1.0, "logit_bias": {40: 5.0}, "min_new_tokens": 0, "ignore_eos": False}]
    options = [off, on[0], off, on[1]]
    requests = [dict(input_ids=[5, 6, 7 + i], adapter=(A1, A2)[i % 2], max_new_tokens=8, **options[i])
                for i in range(4)]
    answers = concurrently([lambda r=r: ServeClient(llama_bank.url).generate(**r) for r in requests])
    for request, answer, extra in zip(requests, answers, options):
        assert answer.outputs["output_ids"] == ref.generate(request["input_ids"], request["adapter"], 8, **extra)
    assert [a.batch_size for a in answers] == [2, 1, 2, 1]
    assert answers[1].outputs["output_ids"] != ref.generate([5, 6, 8], A2, 8)


BAD = [  # (the body's parameters, what the 400 says)
    ({"presence_penalty": 2.5}, "presence_penalty must be a number from -2 to 2"),
    ({"frequency_penalty": "1"}, "`frequency_penalty` must be a number"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a finite number > 0"),
    ({"min_p": 1.5}, "min_p must be a number from 0 to 1"),
    ({"top_k": 2.5}, "`top_k` must be an integer"),
    ({"top_k": 2**40}, "`top_k` is out of range"),
    ({"top_k": -3}, "top_k must be an integer >= 0"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_new_tokens must be an integer from 0 to max_new_tokens (4)"),
    ({"ignore_eos": "yes"}, "`ignore_eos` must be true or false"),
    ({"logit_bias": [5]}, "`logit_bias` must be an object of token ids to biases"),
    ({"logit_bias": {"5": 101}}, "logit_bias must map token ids (integers >= 0) to biases from -100 to 100"),
    ({"logit_bias": {"cat": 1}}, "logit_bias must map token ids"),
    ({"logit_bias": {"100000": 1}}, "logit_bias names token 100000, outside the vocabulary of"),
    ({"best_of": 3}, "`best_of` is not implemented by this server"),
    ({"suffix": "x"}, "`suffix` is not implemented by this server"),
    ({"response_format": {"type": "json_object"}}, "`response_format` is not implemented by this server"),
]


@pytest.mark.parametrize("body, message", BAD, ids=[next(iter(b)) + "-" + str(i) for i, (b, _) in enumerate(BAD)])
@pytest.mark.parametrize("path", ["completions", "chat/completions"])
def test_bad_values_are_a_400_naming_the_field(continuous, path, body, message):
    prompt = {"prompt": "hi"} if path == "completions" else {"messages": [{"role": "user", "content": "hi"}]}
    status, answer = post_openai(continuous.openai, path, {"model": A1, "max_tokens": 4, **prompt, **body})
    assert (status, message in answer) == (400, True), answer


def test_the_off_values_clients_send_change_nothing(continuous, reference):
    import openai

    ref = reference("llama-bank")
    client = openai.OpenAI(base_url=continuous.openai, api_key="unused")
    off = client.completions.create(model=A1, prompt=PROMPT, max_tokens=12, presence_penalty=0, frequency_penalty=0,
                                    logit_bias={}, best_of=1, extra_body={"top_k": -1, "min_p": 0,
                                                                          "repetition_penalty": 1, "min_tokens": 0,
                                                                          "ignore_eos": False})
    assert off.choices[0].text == ref.decode(ref.generate(ref.encode(PROMPT), A1, 12))
