"""`classify` for text-classification exports (the shipped MiniLM classifier's kind): one forward
pass per request, many adapters in one bank batch, logits equal to the request run alone."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import concurrently, folder

from ia3_export.serve import ServeClient, ServeError

B1, B2 = "bert-a1", "bert-a2"


@pytest.fixture(scope="module")
def bert_bank(start_server):
    return start_server(folder("bert-bank"), "--max-batch", "8", "--max-queue-delay-us", "300000", "--drain-timeout", "10")


def alone(session, ids: list[int], adapter: str | None) -> np.ndarray:
    ids = np.array([ids], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return session.run(feeds, adapters=[adapter])["logits"][0]


@pytest.mark.parametrize("prompt", ["text", "input_ids"])
def test_mixed_adapters_and_lengths_classify_in_one_batch(bert_bank, reference, prompt):
    ref = reference("bert-bank")
    adapters = [B1, B2, None, B1, B2, None]
    requests = [{"text": "good " * (1 + i)} if prompt == "text" else {"input_ids": list(range(5, 7 + i))}
                for i in range(len(adapters))]
    requests = [{**r, "adapter": a} for r, a in zip(requests, adapters)]

    def classify(r):
        with ServeClient(bert_bank.url) as c:
            return c.classify(**r)

    answers = concurrently([lambda r=r: classify(r) for r in requests])
    assert all(not isinstance(a, Exception) for a in answers), answers
    assert [a.batch_size for a in answers] == [6] * 6  # one ONNX Runtime batch, adapters mixed, right-padded
    for request, answer in zip(requests, answers):
        ids = request.get("input_ids") or ref.encode(request["text"])
        expected = alone(ref.session, ids, request["adapter"])
        np.testing.assert_allclose(answer.outputs["logits"], expected, rtol=1e-5, atol=1e-5)
        assert answer.outputs["label"] == f"LABEL_{int(expected.argmax())}"  # id2label of config.json


def test_classify_faults(bert_bank):
    with ServeClient(bert_bank.url) as c:
        with pytest.raises(ServeError, match="the prompt has 200 tokens, over this model's limit of 128"):
            c.classify(input_ids=[5] * 200, adapter=B1)
        with pytest.raises(ServeError, match="adapter 'bert-a3' is not loaded"):
            c.classify(text="fine", adapter="bert-a3")
        assert c.adapters("load", source=folder("bert-a3")) == {"loaded": "bert-a3"}
        assert c.classify(text="fine", adapter="bert-a3").outputs["label"].startswith("LABEL_")


def test_real_minilm_with_its_padding_tokenizer(start_server, reference):
    """MiniLM-L6's tokenizer.json pads every text to 128 tokens: the server drops that padding so texts
    batch at their own lengths; the reference runs each text alone exactly as its tokenizer encodes
    it (128 tokens with the tokenizer's own attention mask)."""
    from tokenizers import Tokenizer

    server = start_server(folder("minilm-bank"), "--max-batch", "4", "--max-queue-delay-us", "300000",
                          "--drain-timeout", "10")
    texts = ["great film", "the plot was dull and far too long", "ok", "I would watch it again, twice!"]
    adapters = ["minilm-a1", None, None, "minilm-a1"]

    def classify(text, adapter):
        with ServeClient(server.url) as c:
            return c.classify(text=text, adapter=adapter)

    answers = concurrently([lambda t=t, a=a: classify(t, a) for t, a in zip(texts, adapters)])
    assert [a.batch_size for a in answers] == [4] * 4
    session = reference("minilm-bank").session
    tokenizer = Tokenizer.from_file(folder("minilm-bank", "tokenizer.json"))
    for text, adapter, answer in zip(texts, adapters, answers):
        encoding = tokenizer.encode(text)
        assert len(encoding.ids) == 128
        ids, mask = np.array([encoding.ids]), np.array([encoding.attention_mask])
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        expected = session.run(feeds, adapters=[adapter])["logits"][0]
        np.testing.assert_allclose(answer.outputs["logits"], expected, rtol=1e-4, atol=1e-5)
