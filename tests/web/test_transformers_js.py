"""Merged exports load in transformers.js as users load any model (issue 24): `export --layout
transformers.js` writes the folder, and `pipeline(task, name)` in Node, offline (allowRemoteModels
false, localModelPath, local_files_only), runs it. Checked against independent references:
- text-generation (tiny Llama + a random adapter): transformers.js' greedy tokens and text equal our
  runtime's (IA3Session on the same folder) and PEFT's `generate(do_sample=False)`; its logits equal ours
  and PEFT's; the int8, int4 and fp16 files load by their names (no `dtype` option) and equal our runtime
  on the same file, not the fp32 one.
- text-classification (the shipped MiniLM, an adapter trained with its label names): the trained names
  come back, with our runtime's probabilities (1e-4).
- feature-extraction (a tiny BERT + a random adapter): last_hidden_state equals ours and PEFT's (1e-4).
Negative checks: the default layout is not found by transformers.js; a corrupted weight moves its
tokens and logits away from ours; swapped label names come back swapped.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from runtime_helpers import peft_greedy, peft_logits

LAYOUT = "transformers.js"
PROMPTS = ["hello world", "the cat sat on"]
NEW_TOKENS = 16
TEXTS = ["The battery died after two days.", "Lovely staff and a spotless room.", "It arrived on time."]


@pytest.fixture(scope="module")
def llama(tmp_path_factory, model_dir, adapter_dir):
    """export(name, **options) -> the transformers.js folder `root/name` of a tiny Llama merged with a
    random adapter (built once per name); `root` is transformers.js' localModelPath."""
    from ia3_export.export import export_model

    root, base, adapter = tmp_path_factory.mktemp("tjs-models"), model_dir("llama"), adapter_dir("llama")

    def export(name: str, **options) -> str:
        if not (root / name).exists():
            export_model(base, str(root / name), mode="merged", adapters=[adapter], **{"layout": LAYOUT, **options})
        return name

    return {"root": root, "base": base, "adapter": adapter, "export": export}


def generate_in_node(node, root, name: str, dtype: str | None = None) -> list[dict]:
    return node("tjs_generate.mjs", root, name, NEW_TOKENS, json.dumps(PROMPTS), *([dtype] if dtype else []))["rows"]


def ours(folder: str, rows: list[dict]) -> dict:
    """Our runtime on `folder`, fed the prompt ids transformers.js' tokenizer made: new tokens, text, last logits."""
    from ia3_export.runtime import IA3Session
    from ia3_export.runtime.generation import GenerationOptions, empty_cache, generate_ids, position_ids

    session = IA3Session(folder)
    ids = [r["prompt_ids"] for r in rows]
    assert [session.tokenizer().encode(r["prompt"]) for r in rows] == ids  # both tokenizers agree
    logits = []
    for p in ids:
        prompt = np.array([p], dtype=np.int64)
        mask = np.ones_like(prompt)
        feeds = {"input_ids": prompt, "attention_mask": mask, "position_ids": position_ids(mask),
                 **empty_cache(session.graphs["model"], 1, session.folder.dtype, session.folder.cache)}
        logits.append(session.run(feeds)["logits"][0, -1].astype(np.float64))
    return {"new_ids": generate_ids(session, ids, None, GenerationOptions(max_new_tokens=NEW_TOKENS)),
            "texts": [session.generate(r["prompt"], max_new_tokens=NEW_TOKENS) for r in rows],
            "last_logits": np.array(logits)}


def theirs_logits(rows) -> np.ndarray:
    return np.array([r["last_logits"] for r in rows])


def test_greedy_text_equals_our_runtime_and_peft(node, llama):
    name = llama["export"]("fp32")
    folder = str(llama["root"] / name)
    rows = generate_in_node(node, llama["root"], name)
    mine = ours(folder, rows)
    peft = peft_greedy(llama["base"], llama["adapter"], [r["prompt_ids"] for r in rows], NEW_TOKENS)
    for row, new_ids, text, reference in zip(rows, mine["new_ids"], mine["texts"], peft):
        assert row["new_ids"] == new_ids == reference, row["prompt"]
        assert len(row["new_ids"]) == NEW_TOKENS or row["new_ids"][-1] == 2  # ran to the end or stopped at EOS
        assert row["text"] == text, row["prompt"]
    np.testing.assert_allclose(theirs_logits(rows), mine["last_logits"], atol=1e-4, rtol=1e-4)
    peft_last = np.array([peft_logits(llama["base"], llama["adapter"], np.array([r["prompt_ids"]]),
                                      np.ones((1, len(r["prompt_ids"])), np.int64))[0, -1] for r in rows])
    np.testing.assert_allclose(theirs_logits(rows), peft_last, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options, file", [({"quantize": "int8"}, "model_int8.onnx"),
                                           ({"quantize": "int4"}, "model_q4.onnx"),
                                           ({"dtype": "fp16"}, "model_fp16.onnx")])
def test_quantized_and_fp16_files_load_by_their_names_and_equal_our_runtime(node, llama, options, file):
    name = llama["export"](*options.values(), **options)
    folder = str(llama["root"] / name)
    assert os.listdir(os.path.join(folder, "onnx")) == [file]  # no model.onnx to fall back on
    rows = generate_in_node(node, llama["root"], name)
    mine = ours(folder, rows)
    assert [r["new_ids"] for r in rows] == mine["new_ids"]
    assert [r["text"] for r in rows] == mine["texts"]
    np.testing.assert_allclose(theirs_logits(rows), mine["last_logits"], atol=1e-4, rtol=1e-4)
    # ... and it ran that file, not float32 weights: the same bound fails against the fp32 export
    fp32 = ours(str(llama["root"] / llama["export"]("fp32")), rows)["last_logits"]
    assert not np.allclose(theirs_logits(rows), fp32, atol=1e-4, rtol=1e-4)


def test_the_default_layout_is_not_found_and_a_corrupted_weight_shows(node, llama, tmp_path):
    """Two ways this test file fails when it should: transformers.js finds no graph in our default
    (optimum) layout, and a corrupted LM head changes its logits and tokens away from our runtime's
    on the intact folder."""
    import onnx
    from onnx import numpy_helper

    from ia3_export.export import export_model

    export_model(llama["base"], str(llama["root"] / "optimum"), mode="merged", adapters=[llama["adapter"]])
    done = node("tjs_generate.mjs", llama["root"], "optimum", NEW_TOKENS, json.dumps(PROMPTS), check=False)
    assert done.returncode != 0 and "onnx/model.onnx" in done.stderr, done.stderr[-2000:]

    name = llama["export"]("fp32")
    broken = llama["root"] / "broken"
    shutil.copytree(llama["root"] / name, broken)
    graph = onnx.load(str(broken / "onnx" / "model.onnx"))
    with open(broken / "config.json") as f:
        config = json.load(f)
    hidden, vocab = config["hidden_size"], config["vocab_size"]  # the LM head, [hidden, vocab] as MatMul takes it
    head = next(t for t in graph.graph.initializer if tuple(t.dims) == (hidden, vocab))
    weight = numpy_helper.to_array(head).copy()
    weight[:, ::2] *= -1
    head.CopyFrom(numpy_helper.from_array(weight, head.name))
    onnx.save(graph, str(broken / "onnx" / "model.onnx"))
    rows = generate_in_node(node, llama["root"], "broken")
    intact = ours(str(llama["root"] / name), rows)
    assert np.abs(theirs_logits(rows) - intact["last_logits"]).max() > 1e-2
    assert [r["new_ids"] for r in rows] != intact["new_ids"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """The shipped MiniLM with an IA3 classifier adapter trained briefly on the shipped reviews (its labels
    come from the data: labels.json), merged into a transformers.js folder `root/minilm`."""
    from ia3_export.examples.shipped import data_file, minilm_dir, one_thread
    from ia3_export.export import export_model
    from ia3_export.train.loop import train

    root = tmp_path_factory.mktemp("tjs-classifier")
    with one_thread():
        trained = train(minilm_dir(), data_file("reviews_train.jsonl"), "text-classification", str(root / "adapter"),
                        quiet=True, learning_rate=2e-2, max_steps=8, batch_size=8, max_length=64)
    export_model(minilm_dir(), str(root / "models" / "minilm"), mode="merged", adapters=[trained.adapter_dir],
                 layout=LAYOUT)
    return {"root": root / "models", "name": "minilm", "labels": trained.labels}


def probabilities(folder: str, texts) -> np.ndarray:
    """Our runtime's softmax over the classifier's logits, each text encoded by the folder's tokenizer."""
    from ia3_export.runtime import IA3Session

    session = IA3Session(folder)
    rows = []
    for text in texts:
        ids = np.array([session.tokenizer().encode(text)], dtype=np.int64)
        logits = session.run({"input_ids": ids, "attention_mask": np.ones_like(ids),
                              "token_type_ids": np.zeros_like(ids)})["logits"][0].astype(np.float64)
        rows.append(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())
    return np.array(rows)


def scores_by_label(row: list[dict], labels: list[str]) -> np.ndarray:
    got = {entry["label"]: entry["score"] for entry in row}
    assert sorted(got) == sorted(labels), got
    return np.array([got[label] for label in labels])


def test_classifier_labels_are_the_trained_names_with_our_probabilities(node, classifier):
    labels = classifier["labels"]
    assert sorted(labels) == ["negative", "positive"]  # the reviews' own label names, not LABEL_i
    result = node("tjs_classify.mjs", classifier["root"], classifier["name"], json.dumps(TEXTS))
    assert result["id2label"] == {str(i): label for i, label in enumerate(labels)}
    theirs = np.array([scores_by_label(row, labels) for row in result["rows"]])
    expected = probabilities(str(classifier["root"] / classifier["name"]), TEXTS)
    np.testing.assert_allclose(theirs, expected, atol=1e-4, rtol=0)
    assert [row[0]["label"] for row in result["rows"]] == [labels[i] for i in expected.argmax(axis=1)]


def test_swapped_label_names_come_back_swapped(node, classifier):
    """The labels transformers.js shows are config.json's id2label: swap the two names and each text's
    scores come back under the other name (the check above would fail on such a folder)."""
    labels = classifier["labels"]
    swapped = classifier["root"] / "swapped"
    shutil.copytree(classifier["root"] / classifier["name"], swapped)
    with open(swapped / "config.json") as f:
        config = json.load(f)
    config["id2label"] = {str(i): label for i, label in enumerate(reversed(labels))}
    config["label2id"] = {label: i for i, label in enumerate(reversed(labels))}
    with open(swapped / "config.json", "w") as f:
        json.dump(config, f)
    result = node("tjs_classify.mjs", classifier["root"], "swapped", json.dumps(TEXTS))
    theirs = np.array([scores_by_label(row, labels) for row in result["rows"]])
    expected = probabilities(str(classifier["root"] / classifier["name"]), TEXTS)
    np.testing.assert_allclose(theirs, expected[:, ::-1], atol=1e-4, rtol=0)
    assert np.abs(theirs - expected).max() > 1e-2  # the trained head does not sit at 0.5


def test_feature_extraction_equals_our_runtime_and_peft(node, model_dir, adapter_dir, tmp_path):
    """A tiny BERT encoder merged with a random adapter: transformers.js' feature-extraction output (no
    pooling) is our runtime's last_hidden_state and PEFT's, on the ids its tokenizer made."""
    import torch
    from peft import PeftModel
    from transformers import AutoModel

    from ia3_export.export import export_model
    from ia3_export.runtime import IA3Session

    base, adapter = model_dir("bert", "feature-extraction"), adapter_dir("bert", "feature-extraction")
    export_model(base, str(tmp_path / "bert"), adapters=[adapter], layout=LAYOUT)
    rows = node("tjs_features.mjs", tmp_path, "bert", json.dumps(TEXTS[:2]))["rows"]
    session = IA3Session(str(tmp_path / "bert"))
    peft = PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter).eval()
    for row in rows:
        ids = np.array([row["input_ids"]], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        theirs = np.array(row["hidden"])
        np.testing.assert_allclose(theirs, session.run(feeds)["last_hidden_state"][0], atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            reference = peft(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state[0].numpy()
        np.testing.assert_allclose(theirs, reference, atol=1e-4, rtol=1e-4)


def test_weights_in_external_data_load_by_transformers_js_names(node, llama, tmp_path, monkeypatch):
    """Past the protobuf limit (lowered here) the weights go to `onnx/<file>_data`, the name transformers.js
    derives from the graph's, and config.json lists the file; Node loads it and equals our runtime."""
    from ia3_export.export import export_model, graph

    monkeypatch.setattr(graph, "EXTERNAL_DATA_ABOVE", 0)
    export_model(llama["base"], str(tmp_path / "split"), adapters=[llama["adapter"]], layout=LAYOUT, quantize="int4")
    assert sorted(os.listdir(tmp_path / "split" / "onnx")) == ["model_q4.onnx", "model_q4.onnx_data"]
    with open(tmp_path / "split" / "config.json") as f:
        assert json.load(f)["transformers.js_config"] == {"dtype": "q4", "use_external_data_format": {"model_q4.onnx": 1}}
    rows = generate_in_node(node, tmp_path, "split")
    mine = ours(str(tmp_path / "split"), rows)
    assert [r["new_ids"] for r in rows] == mine["new_ids"]
    np.testing.assert_allclose(theirs_logits(rows), mine["last_logits"], atol=1e-4, rtol=1e-4)
