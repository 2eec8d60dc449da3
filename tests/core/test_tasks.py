"""The adapter says what it is: its task_type picks the head, its labels.json names the classes.

A classifier trained by `ia3-export train` on a bare encoder (config.json says `BertModel`, as
MiniLM's does) merges and exports without --task, and the results carry the head architecture,
num_labels and the training label names (checked with transformers' pipeline and ONNX Runtime
against PEFT's unmerged model); a --task or an export that contradicts the adapter is refused.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli

LABELS = ["negative", "neutral", "positive"]
TEXTS = ["good film", "bad plot", "it was ok", "what a great day"]


def read_config(folder) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def assert_names_the_head(folder, labels=LABELS):
    config = read_config(folder)
    assert config["architectures"] == ["BertForSequenceClassification"], config["architectures"]
    assert config["num_labels"] == len(labels)
    assert config["id2label"] == {str(i): name for i, name in enumerate(labels)}
    assert config["label2id"] == {name: i for i, name in enumerate(labels)}


def save_adapter(base: str, out: str, task_type: str) -> str:
    """A vector-only adapter (random vectors) that declares task_type."""
    from ia3_export.core.config import IA3Config
    from ia3_export.core.loading import load_base_model
    from ia3_export.core.model import IA3Model
    from ia3_export.examples.tiny import randomize_adapter

    model = IA3Model(load_base_model(base), IA3Config(task_type=task_type))
    randomize_adapter(model, "default", seed=4)
    return model.save_adapter(out)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A bare tiny BERT, a classifier adapter trained on it by the CLI, merged and exported without --task."""
    from ia3_export.examples.tiny import save_tiny

    root = tmp_path_factory.mktemp("tasks")
    base = save_tiny(str(root / "base"), "bert", "feature-extraction")
    data = root / "reviews.jsonl"
    words = {"negative": "bad", "neutral": "ok", "positive": "good"}
    with open(data, "w") as f:
        for i in range(10):
            for label, word in words.items():
                f.write(json.dumps({"text": f"{word} thing {i}", "label": label}) + "\n")
    adapter = str(root / "classifier")
    trained = run_cli("train", base, "--data", data, "--task", "text-classification", "--out", adapter,
                      "--max-steps", "3", "--lr", "0.05", "--quiet")
    assert trained.exit_code == 0, trained.output
    merged, onnx_dir = str(root / "merged"), str(root / "onnx")
    merge = run_cli("merge", base, adapter, "--out", merged)
    export = run_cli("export", base, "--adapter", adapter, "--out", onnx_dir)
    return {"root": root, "base": base, "adapter": adapter, "merged": merged, "onnx": onnx_dir,
            "merge": merge, "export": export}


def peft_logits(base: str, adapter: str, texts=TEXTS) -> tuple[np.ndarray, dict]:
    """PEFT's model (adapter unmerged) on a classifier head built for the adapter's 3 labels."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(LABELS)), adapter).eval()
    with torch.no_grad():
        return model(**batch).logits.numpy(), {k: v.numpy() for k, v in batch.items()}


def test_train_writes_the_label_names_beside_the_peft_files(made):
    folder = made["adapter"]
    with open(os.path.join(folder, "labels.json")) as f:
        assert json.load(f) == {"id2label": {"0": "negative", "1": "neutral", "2": "positive"}}
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    assert read_config(made["base"])["architectures"] == ["BertModel"]  # the bare encoder this is about


def test_merge_without_task_builds_the_named_head(made):
    from transformers import AutoModelForSequenceClassification

    assert made["merge"].exit_code == 0, made["merge"].output
    assert_names_the_head(made["merged"])
    expected, batch = peft_logits(made["base"], made["adapter"])
    merged = AutoModelForSequenceClassification.from_pretrained(made["merged"]).eval()
    with torch.no_grad():
        got = merged(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_pipeline_on_the_merged_folder_shows_the_training_names(made):
    from transformers import pipeline

    assert made["merge"].exit_code == 0, made["merge"].output
    classify = pipeline("text-classification", model=made["merged"], device="cpu")
    expected, _ = peft_logits(made["base"], made["adapter"])
    got = [classify(text)[0] for text in TEXTS]
    assert [g["label"] for g in got] == [LABELS[i] for i in expected.argmax(-1)]
    probs = torch.softmax(torch.from_numpy(expected), -1).max(-1).values.numpy()
    np.testing.assert_allclose([g["score"] for g in got], probs, atol=1e-5)


def test_export_without_task_carries_the_head_and_the_names(made):
    import onnxruntime as ort

    assert made["export"].exit_code == 0, made["export"].output
    with open(os.path.join(made["onnx"], "ia3_export.json")) as f:
        assert json.load(f)["task"] == "text-classification"
    assert_names_the_head(made["onnx"])
    expected, batch = peft_logits(made["base"], made["adapter"])
    session = ort.InferenceSession(os.path.join(made["onnx"], "model.onnx"), providers=["CPUExecutionProvider"])
    zeros = np.zeros_like(batch["input_ids"])  # the tiny tokenizer makes no token_type_ids; BERT's default
    feeds = {i.name: batch.get(i.name, zeros).astype(np.int64) for i in session.get_inputs()}
    (got,) = session.run(["logits"], feeds)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_parity_takes_the_head_from_the_adapter(made):
    """The reference is built with the adapter's 3-label head (transformers' default would be 2)."""
    from ia3_export.parity import check_parity

    assert made["export"].exit_code == 0, made["export"].output
    report = check_parity(made["base"], made["onnx"], [made["adapter"]], greedy_steps=0)
    assert report.passed and report.outputs, report.summary()


@pytest.mark.parametrize("mode", ["swappable", "foldswap"])
def test_every_export_mode_names_the_classifier_head(made, mode, tmp_path):
    """task text-classification on a bare encoder: the export's config.json says what the graph is."""
    from ia3_export.export import export_model

    export_model(made["base"], str(tmp_path / mode), mode=mode, task="text-classification")
    assert_names_the_head(tmp_path / mode, ["LABEL_0", "LABEL_1"])  # a new head: transformers' default 2 labels


def test_without_labels_json_the_base_names_or_the_head_size_are_used(made, tmp_path):
    """No labels.json: the base config's id2label when its size matches the head, else LABEL_i."""
    from ia3_export.core.merge import merge_to_folder

    bare = str(tmp_path / "bare")
    shutil.copytree(made["adapter"], bare)
    os.remove(os.path.join(bare, "labels.json"))
    merge_to_folder(made["base"], [bare], str(tmp_path / "a"))
    assert_names_the_head(tmp_path / "a", ["LABEL_0", "LABEL_1", "LABEL_2"])
    assert made["merge"].exit_code == 0, made["merge"].output
    merge_to_folder(made["merged"], [bare], str(tmp_path / "b"))  # a base whose config names the labels
    assert_names_the_head(tmp_path / "b")


@pytest.mark.parametrize("command", ["merge", "export"])
def test_a_task_that_contradicts_the_adapter_is_refused(made, command, tmp_path):
    out = tmp_path / "out"
    args = [made["base"], made["adapter"]] if command == "merge" else [made["base"], "--adapter", made["adapter"]]
    result = run_cli(command, *args, "--task", "feature-extraction", "--out", out)
    line = assert_one_line_error(result, 2, "--task feature-extraction contradicts task_type SEQ_CLS")
    assert made["adapter"] in line
    assert not out.exists()


def test_adapters_of_different_tasks_are_refused_together(made, tmp_path):
    lm = save_adapter(made["base"], str(tmp_path / "lm"), "CAUSAL_LM")
    result = run_cli("merge", made["base"], made["adapter"], lm, "--out", tmp_path / "out")
    line = assert_one_line_error(result, 2, "trained for different tasks")
    assert "SEQ_CLS" in line and "CAUSAL_LM" in line


def test_convert_and_parity_refuse_an_adapter_of_another_task(made, tmp_path):
    from ia3_export.export import export_model

    onnx_dir = tmp_path / "swappable"
    assert export_model(made["base"], str(onnx_dir), mode="swappable")["task"] == "feature-extraction"  # BertModel
    lm = save_adapter(made["base"], str(tmp_path / "lm"), "CAUSAL_LM")
    features = save_adapter(made["base"], str(tmp_path / "features"), "FEATURE_EXTRACTION")
    out = tmp_path / "lm.onnx_adapter"
    result = run_cli("convert", lm, "--model", onnx_dir, "--out", out)
    assert_one_line_error(result, 2, "the export's task feature-extraction contradicts task_type CAUSAL_LM")
    assert not out.exists()
    result = run_cli("convert", features, "--model", onnx_dir, "--out", tmp_path / "features.onnx_adapter")
    assert result.exit_code == 0, result.output  # the same vectors, the export's own task: accepted
    from ia3_export.errors import IA3Error
    from ia3_export.runtime import IA3Session

    session = IA3Session(str(onnx_dir))  # the serving API refuses it the same way
    with pytest.raises(IA3Error, match="the export's task feature-extraction contradicts task_type CAUSAL_LM"):
        session.load_adapter(lm)
    assert session.load_adapter(features) == "features"
    result = run_cli("parity", made["base"], made["onnx"], "--adapter", lm)
    assert_one_line_error(result, 2, "contradicts task_type CAUSAL_LM")


@pytest.mark.parametrize("labels,message", [
    ({"id2label": {"0": "negative", "1": "positive"}}, "names 2 labels but the adapter's head has 3 outputs"),
    ({"id2label": {"0": "a", "2": "b", "3": "c"}}, "keys must be the class ids 0..2"),
    ({"id2label": {"0": "a", "1": "a", "2": "b"}}, "distinct non-empty strings"),
    (["negative"], 'expected {"id2label"'),
])
def test_a_bad_labels_json_is_refused_naming_the_file(made, tmp_path, labels, message):
    from ia3_export.errors import IA3Error
    from ia3_export.core.merge import merge_to_folder

    adapter = shutil.copytree(made["adapter"], tmp_path / "adapter")
    (adapter / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(IA3Error, match=re.escape(f"{adapter}/labels.json: ") + f".*{re.escape(message)}"):
        merge_to_folder(made["base"], [str(adapter)], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
