"""`export --layout transformers.js`: the folder transformers.js reads (files per dtype under onnx/,
config.json naming the dtype), still a folder our runtime and `parity` open; and what transformers.js cannot
drive is refused in one line before any work. That transformers.js itself loads and runs these
folders is tests/web/test_transformers_js.py (Node, IA3_WEB=1)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run_cli


def read(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


@pytest.mark.parametrize("quantize, file, dtype", [(None, "model.onnx", "fp32"), ("int4", "model_q4.onnx", "q4")])
def test_the_graph_goes_to_onnx_named_by_its_dtype(tmp_path, model_dir, adapter_dir, quantize, file, dtype):
    from ia3_export.runtime import IA3Session
    from ia3_export.runtime.generation import GenerationOptions, generate_ids

    base, adapter = model_dir("llama"), adapter_dir("llama")
    out = str(tmp_path / "tjs")
    args = ["--quantize", quantize] if quantize else []
    done = run_cli("export", base, "--adapter", adapter, "--out", out, "--layout", "transformers.js", *args)
    assert done.exit_code == 0, done.output
    assert sorted(os.listdir(os.path.join(out, "onnx"))) == [file]
    assert not os.path.exists(os.path.join(out, "model.onnx"))
    for side in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(out, side)), side
    assert read(out, "config.json")["transformers.js_config"] == {"dtype": dtype}
    manifest = read(out, "ia3_export.json")
    assert manifest["graphs"]["model"]["file"] == f"onnx/{file}" and manifest["layout"] == "transformers.js"
    # our runtime reads the same folder and generates what it does from the default layout's
    default = str(tmp_path / "default")
    assert run_cli("export", base, "--adapter", adapter, "--out", default, *args).exit_code == 0
    options = GenerationOptions(max_new_tokens=8)
    ours = [generate_ids(IA3Session(f), [[5, 6, 7, 8]], None, options)[0] for f in (out, default)]
    assert ours[0] == ours[1]
    checked = run_cli("parity", base, out, "--adapter", adapter)  # and parity finds the graph under onnx/
    assert checked.exit_code == 0 and "PASS" in checked.stdout, checked.output
    assert read(default, "ia3_export.json")["graphs"]["model"]["file"] == "model.onnx"
    assert "transformers.js_config" not in read(default, "config.json") and "layout" not in read(default, "ia3_export.json")


def test_the_base_models_transformers_js_config_is_kept(tmp_path, model_dir):
    """A base model that already says something to transformers.js (a converted model's config) keeps it;
    the dtype is the export's."""
    import shutil

    base = str(tmp_path / "base")
    shutil.copytree(model_dir("bert", "seq-cls"), base)
    config = read(base, "config.json")
    config["transformers.js_config"] = {"dtype": "q4", "kv_cache_dtype": "float16"}
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump(config, f)
    out = str(tmp_path / "tjs")
    from ia3_export.export import export_model

    export_model(base, out, layout="transformers.js", quantize="int8")
    assert read(out, "config.json")["transformers.js_config"] == {"dtype": "int8", "kv_cache_dtype": "float16"}
    assert os.listdir(os.path.join(out, "onnx")) == ["model_int8.onnx"]
    from ia3_export.runtime import IA3Session

    ids = np.array([[5, 6, 7]], dtype=np.int64)
    logits = IA3Session(out).run({"input_ids": ids, "attention_mask": np.ones_like(ids),
                                  "token_type_ids": np.zeros_like(ids)})["logits"]
    assert logits.shape == (1, len(read(out, "config.json")["id2label"])) and np.isfinite(logits).all()


@pytest.mark.parametrize("args, message", [
    (["--mode", "swappable"], "--layout transformers.js needs --mode merged: transformers.js feeds only the model's "
                              "own inputs, so a swappable export's adapters could not be selected"),
    (["--mode", "bank"], "needs --mode merged"),
    (["--graph", "fused"], "--layout transformers.js needs --graph traced: transformers.js cannot drive the fused graph"),
    (["--task", "text-generation"], "--layout transformers.js supports text-generation-with-past, text-classification, "
                                    "feature-extraction, not text-generation; export without --layout"),
])
def test_what_transformers_js_cannot_drive_is_refused_in_one_line(tmp_path, model_dir, adapter_dir, args, message):
    out = tmp_path / "out"
    done = run_cli("export", model_dir("llama"), "--adapter", adapter_dir("llama"), "--out", str(out),
                   "--layout", "transformers.js", *args)
    assert_one_line_error(done, 2, message)
    assert not out.exists()


def test_seq2seq_is_refused(tmp_path, model_dir):
    done = run_cli("export", model_dir("t5"), "--out", str(tmp_path / "out"), "--layout", "transformers.js")
    assert_one_line_error(done, 2, "not text2text-generation-with-past; export without --layout")
