"""optimum loads our merged exports: ORTModelForCausalLM (greedy generate equals PEFT's tokens)
and ORTModelForSequenceClassification (logits equal PEFT's, trained head included; the label
names `ia3-export train` saw show in its config and in a transformers pipeline).

Models and adapters are made here with PEFT itself; the exports by IA3_EXPORT_CLI (the main
venv's `ia3-export`, transformers 5.x) or in this process when IA3_EXPORT_CLI=inprocess.
"""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch

from ia3_export.examples.tiny import save_tiny

EXPORT_CLI = os.environ.get("IA3_EXPORT_CLI", "inprocess")


def peft_adapter(model_dir: str, out: str, auto_class: str, task_type: str | None) -> str:
    """A PEFT IA3 adapter with random (non-identity) vectors, saved by PEFT."""
    import transformers
    from peft import IA3Config, get_peft_model

    base = getattr(transformers, auto_class).from_pretrained(model_dir)
    model = get_peft_model(base, IA3Config(task_type=task_type))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * (2 * torch.rand(p.shape, generator=generator) - 1))
            elif "modules_to_save" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(out)
    return out


def export(model_dir: str, adapter: str, out: str) -> str:
    if EXPORT_CLI == "inprocess":
        from ia3_export.export import export_model

        export_model(model_dir, out, adapters=[adapter])
    else:
        subprocess.run([EXPORT_CLI, "export", model_dir, "--adapter", adapter, "--out", out], check=True)
    return out


def train_classifier(model_dir: str, data: str, out: str) -> str:
    """`ia3-export train --task text-classification` (a new head and labels.json beside the adapter)."""
    if EXPORT_CLI == "inprocess":
        from ia3_export.train import train

        train(model_dir, data, "text-classification", out, quiet=True, max_steps=3, learning_rate=0.05)
    else:
        subprocess.run([EXPORT_CLI, "train", model_dir, "--data", data, "--task", "text-classification", "--out", out,
                        "--max-steps", "3", "--lr", "0.05", "--quiet"], check=True)
    return out


def reference(model_dir: str, adapter: str, auto_class: str, **config):
    import transformers
    from peft import PeftModel

    return PeftModel.from_pretrained(getattr(transformers, auto_class).from_pretrained(model_dir, **config), adapter).eval()


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    model_dir = save_tiny(str(root / "model"), "llama")
    adapter = peft_adapter(model_dir, str(root / "adapter"), "AutoModelForCausalLM", "CAUSAL_LM")
    return model_dir, adapter, export(model_dir, adapter, str(root / "onnx"))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("seqcls")
    model_dir = save_tiny(str(root / "model"), "bert", "seq-cls")
    adapter = peft_adapter(model_dir, str(root / "adapter"), "AutoModelForSequenceClassification", "SEQ_CLS")
    return model_dir, adapter, export(model_dir, adapter, str(root / "onnx"))


LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def named_classifier(tmp_path_factory):
    """A bare BERT (config.json: BertModel, as MiniLM's), a classifier trained on it with string labels,
    exported without --task."""
    import json

    root = tmp_path_factory.mktemp("named")
    model_dir = save_tiny(str(root / "model"), "bert", "feature-extraction")
    data = root / "data.jsonl"
    with open(data, "w") as f:
        for i in range(10):
            for label, word in zip(LABELS, ("bad", "ok", "good")):
                f.write(json.dumps({"text": f"{word} thing {i}", "label": label}) + "\n")
    adapter = train_classifier(model_dir, str(data), str(root / "adapter"))
    return model_dir, adapter, export(model_dir, adapter, str(root / "onnx"))


def test_ort_model_for_causal_lm_generates_peft_tokens(causal):
    from optimum.onnxruntime import ORTModelForCausalLM

    model_dir, adapter, onnx_dir = causal
    ort_model = ORTModelForCausalLM.from_pretrained(onnx_dir, provider="CPUExecutionProvider")
    assert ort_model.use_cache
    ids = torch.tensor([[0, 0, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26]])
    mask = (ids != 0).long()
    kwargs = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0)
    want = reference(model_dir, adapter, "AutoModelForCausalLM").generate(**kwargs)
    got = ort_model.generate(**kwargs)
    assert got.tolist() == want.tolist()


def test_ort_model_for_sequence_classification_matches_peft(classifier):
    from optimum.onnxruntime import ORTModelForSequenceClassification

    model_dir, adapter, onnx_dir = classifier
    ort_model = ORTModelForSequenceClassification.from_pretrained(onnx_dir, provider="CPUExecutionProvider")
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    mask = (ids != 0).long()
    got = ort_model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).logits
    with torch.no_grad():
        want = reference(model_dir, adapter, "AutoModelForSequenceClassification")(input_ids=ids, attention_mask=mask).logits
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4, rtol=0)


def test_ort_classifier_and_pipeline_show_the_training_label_names(named_classifier):
    """optimum reads num_labels and id2label from our config.json; the pipeline names each prediction
    as PEFT's model (adapter unmerged, head built for 3 labels) ranks it."""
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer, pipeline

    model_dir, adapter, onnx_dir = named_classifier
    ort_model = ORTModelForSequenceClassification.from_pretrained(onnx_dir, provider="CPUExecutionProvider")
    assert ort_model.config.id2label == dict(enumerate(LABELS))
    assert ort_model.config.label2id == {name: i for i, name in enumerate(LABELS)}
    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    classify = pipeline("text-classification", model=ort_model, tokenizer=tokenizer)
    texts = ["good film", "bad plot", "it was ok", "what a great day"]
    got = [classify(text)[0] for text in texts]
    reference_model = reference(model_dir, adapter, "AutoModelForSequenceClassification", num_labels=len(LABELS))
    with torch.no_grad():
        want = torch.cat([reference_model(**tokenizer(text, return_tensors="pt")).logits for text in texts])
    assert [g["label"] for g in got] == [LABELS[i] for i in want.argmax(-1).tolist()]
    np.testing.assert_allclose([g["score"] for g in got], torch.softmax(want, -1).max(-1).values.numpy(), atol=1e-4)
