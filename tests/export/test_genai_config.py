"""genai_config.json, checked against what it describes: the ONNX graph's own input/output names,
config.json's sizes and positions, and the manifest's listing (onnxruntime-genai itself runs in
tests/interop_genai, in its own venv)."""
from __future__ import annotations

import json
import os

import pytest

from runtime_helpers import export_once


def read(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_config_names_the_graphs_inputs_and_outputs_and_the_models_sizes(tmp_path_factory, model_dir, adapter_dir,
                                                                          model_type):
    import onnx

    base = model_dir(model_type)
    folder = export_once(tmp_path_factory, base, "swappable", [adapter_dir(model_type)])
    manifest, genai, config = read(folder, "ia3_export.json"), read(folder, "genai_config.json"), read(base, "config.json")
    assert manifest["genai"] == {"supported": True,
                                 "files": ["genai_config.json", "tokenizer.json", "tokenizer_config.json"]}
    decoder = genai["model"]["decoder"]
    graph = onnx.load(os.path.join(folder, decoder["filename"]), load_external_data=False).graph
    layers = decoder["num_hidden_layers"]
    assert layers == config.get("num_hidden_layers", config.get("n_layer"))
    inputs = decoder["inputs"]
    named = [inputs[k] for k in ("input_ids", "attention_mask", "position_ids")]
    named += [inputs[k] % i for i in range(layers) for k in ("past_key_names", "past_value_names")]
    vectors = {v["name"] for v in manifest["vectors"]}  # overridable initializers: adapters set them
    assert named == [i.name for i in graph.input if i.name not in vectors]
    outputs = decoder["outputs"]
    assert [outputs["logits"]] + [outputs[k] % i for i in range(layers) for k in ("present_key_names", "present_value_names")] \
        == [o.name for o in graph.output]
    past = next(i for i in graph.input if i.name == "past_key_values.0.key").type.tensor_type.shape.dim
    heads = config.get("num_key_value_heads", config.get("n_head"))
    assert decoder["num_key_value_heads"] == heads
    assert decoder["head_size"] == config.get("hidden_size", config.get("n_embd")) // config.get(
        "num_attention_heads", config.get("n_head"))
    assert past[1].dim_value in (0, heads)  # the graph's head axis, where it is static
    assert genai["model"]["context_length"] == genai["search"]["max_length"] == \
        config.get("max_position_embeddings", config.get("n_positions"))
    assert genai["search"]["past_present_share_buffer"] is False
    assert genai["model"]["eos_token_id"] == config["eos_token_id"] and genai["model"]["vocab_size"] == config["vocab_size"]
    assert genai["model"]["type"] == {"llama": "llama", "gpt2": "decoder"}[model_type]


@pytest.mark.parametrize("mode, reason", [("bank", "adapter_ids"), ("foldswap", "fold.onnx")])
def test_bank_and_foldswap_say_why_genai_cannot_serve_them(tmp_path_factory, model_dir, adapter_dir, mode, reason):
    folder = export_once(tmp_path_factory, model_dir("llama"), mode, [adapter_dir("llama")])
    entry = read(folder, "ia3_export.json")["genai"]
    assert entry["supported"] is False and reason in entry["reason"]
    assert not os.path.exists(os.path.join(folder, "genai_config.json"))


def test_encoder_export_is_not_for_genai(tmp_path_factory, model_dir):
    folder = export_once(tmp_path_factory, model_dir("bert"), "merged", [])
    assert "text-generation-with-past" in read(folder, "ia3_export.json")["genai"]["reason"]


def test_export_time_check_runs_genai_and_fails_on_a_config_it_cannot_serve(tmp_path_factory, tmp_path, model_dir,
                                                                           adapter_dir):
    """Where onnxruntime_genai is importable, export loads the folder with it and compares greedy tokens;
    a config that does not describe the graph is a failed check (exit 1), naming genai."""
    import shutil

    pytest.importorskip("onnxruntime_genai")
    from ia3_export.errors import CheckFailed
    from ia3_export.export.genai import validate_with_genai

    folder = export_once(tmp_path_factory, model_dir("llama"), "merged", [adapter_dir("llama")])
    manifest = read(folder, "ia3_export.json")
    assert validate_with_genai(folder, manifest) == __import__("onnxruntime_genai").__version__
    broken = shutil.copytree(folder, tmp_path / "broken")
    genai = read(broken, "genai_config.json")
    genai["model"]["decoder"]["outputs"]["present_key_names"] = "present_%d_key"  # not the graph's names
    (broken / "genai_config.json").write_text(json.dumps(genai))
    with pytest.raises(CheckFailed, match="onnxruntime-genai 0.18.0 cannot serve this export"):
        validate_with_genai(str(broken), manifest)
