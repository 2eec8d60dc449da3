"""Our IA3 against PEFT's, on every tiny architecture: same outputs, same files, same counts.

PEFT is the reference: adapters it writes load here with the same outputs, adapters we write
load in PEFT with the same outputs, and its trainable-parameter count is ours.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from core_helpers import (ia3_module_names, max_diff, outputs, peft_feedforward, peft_ia3_config,
                          randomize_peft)
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from ia3_export.core.config import IA3Config
from ia3_export.core.model import IA3Model
from ia3_export.examples.tiny import TINY_CONFIGS, randomize_adapter, tiny_model

ALL_TYPES = list(TINY_CONFIGS)
TOL = 1e-5
# (model_type, tiny task, PEFT task_type): the classification heads PEFT saves in full.
HEADS = [("bert", "seq-cls", "SEQ_CLS"), ("llama", "seq-cls", "SEQ_CLS")]


def assert_changes_output(model, base, model_type):
    """Guard against a test passing because both sides run the identity adapter."""
    assert max_diff(outputs(model, model_type), outputs(base, model_type)) > 1e-3


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_peft_adapter_loads_with_same_outputs(model_type, tmp_path):
    peft_model = get_peft_model(tiny_model(model_type), peft_ia3_config(model_type))
    randomize_peft(peft_model)
    peft_model.save_pretrained(tmp_path)

    ours = IA3Model(tiny_model(model_type))
    ours.load_adapter(str(tmp_path), name="default")

    assert set(ours.ia3_layers()) == ia3_module_names(peft_model)
    assert max_diff(outputs(ours, model_type), outputs(peft_model, model_type)) <= TOL
    assert_changes_output(ours, tiny_model(model_type), model_type)


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_our_adapter_loads_in_peft_with_same_outputs(model_type, tmp_path):
    ours = IA3Model(tiny_model(model_type), IA3Config())
    randomize_adapter(ours, "default")
    ours.save_adapter(str(tmp_path / "a"))

    peft_model = PeftModel.from_pretrained(tiny_model(model_type), str(tmp_path / "a"))

    assert set(ours.ia3_layers()) == ia3_module_names(peft_model)
    flags = {path: layer.feedforward["default"] for path, layer in ours.ia3_layers().items()}
    assert flags == peft_feedforward(peft_model)
    assert max_diff(outputs(ours, model_type), outputs(peft_model, model_type)) <= TOL
    assert_changes_output(ours, tiny_model(model_type), model_type)


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_saved_tensors_have_peft_keys_and_shapes(model_type, tmp_path):
    peft_model = get_peft_model(tiny_model(model_type), peft_ia3_config(model_type))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = IA3Model(tiny_model(model_type), IA3Config())
    ours.save_adapter(str(tmp_path / "ours"))

    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert all(v.dtype == torch.float32 for v in mine.values())


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_trainable_parameter_count_equals_peft(model_type):
    peft_model = get_peft_model(tiny_model(model_type), peft_ia3_config(model_type))
    ours = IA3Model(tiny_model(model_type), IA3Config())
    assert ours.trainable_parameters() == peft_model.get_nb_trainable_parameters()
    trainable, total = ours.trainable_parameters()
    assert f"trainable%: {100 * trainable / total:.4f}" in ours.trainable_report()


@pytest.mark.parametrize("model_type", ["qwen2", "opt", "bert", "gpt2", "phi3", "t5"])
def test_adapter_made_with_peft_defaults_loads(model_type, tmp_path):
    """PEFT's own defaults (q/v for qwen2, both output.dense for bert, ...) come through its config file."""
    kwargs = {"target_modules": ["qkv_proj", "down_proj"], "feedforward_modules": ["down_proj"]} if model_type == "phi3" else {}
    peft_model = get_peft_model(tiny_model(model_type), peft_ia3_config(**kwargs))
    randomize_peft(peft_model, seed=5)
    peft_model.save_pretrained(tmp_path)

    ours = IA3Model(tiny_model(model_type))
    ours.load_adapter(str(tmp_path))
    name = ours.active_adapters[0]
    flags = {path: layer.feedforward[name] for path, layer in ours.ia3_layers().items()}
    assert flags == peft_feedforward(peft_model)
    assert max_diff(outputs(ours, model_type), outputs(peft_model, model_type)) <= TOL


@pytest.mark.parametrize("model_type,task,task_type", HEADS)
def test_classification_heads_both_ways(model_type, task, task_type, tmp_path):
    peft_model = get_peft_model(tiny_model(model_type, task), peft_ia3_config(model_type, task_type=task_type))
    randomize_peft(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = IA3Model(tiny_model(model_type, task))
    ours.load_adapter(str(tmp_path / "peft"))
    assert max_diff(outputs(ours, model_type), outputs(peft_model, model_type)) <= TOL
    assert ours.trainable_parameters() == get_peft_model(
        tiny_model(model_type, task), peft_ia3_config(model_type, task_type=task_type)).get_nb_trainable_parameters()

    mine = IA3Model(tiny_model(model_type, task), IA3Config(task_type=task_type))
    randomize_adapter(mine, "default", seed=11)
    mine.save_adapter(str(tmp_path / "ours"))
    head = "classifier" if model_type == "bert" else "score"
    assert f"base_model.model.{head}.weight" in load_file(tmp_path / "ours" / "adapter_model.safetensors")
    back = PeftModel.from_pretrained(tiny_model(model_type, task), str(tmp_path / "ours"))
    assert max_diff(outputs(mine, model_type), outputs(back, model_type)) <= TOL
    # the head itself changed, not only the vectors: the saved head is what PEFT runs
    assert max_diff(outputs(mine, model_type), outputs(ours, model_type)) > 1e-3


def test_non_default_adapter_names_both_ways(tmp_path):
    peft_model = get_peft_model(tiny_model("llama"), peft_ia3_config("llama"), adapter_name="sst2")
    randomize_peft(peft_model)
    peft_model.save_pretrained(tmp_path)  # PEFT puts a non-default adapter in a subfolder
    ours = IA3Model(tiny_model("llama"))
    assert ours.load_adapter(str(tmp_path / "sst2")) == "sst2"
    assert ours.active_adapters == ("sst2",)
    assert max_diff(outputs(ours, "llama"), outputs(peft_model, "llama")) <= TOL

    ours.save_adapter(str(tmp_path / "mine"), name="sst2")
    back = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "mine"), adapter_name="other")
    assert back.active_adapter == "other"
    assert max_diff(outputs(back, "llama"), outputs(ours, "llama")) <= TOL


@pytest.mark.parametrize("model_type,task,task_type,feedforward", [
    ("llama", None, None, ["down_proj"]),
    ("gpt2", None, None, ["mlp.c_proj"]),
    ("bert", "seq-cls", "SEQ_CLS", r".*\.layer\.\d+\.output\.dense"),
])
def test_all_linear_targets_what_peft_targets(model_type, task, task_type, feedforward, tmp_path):
    kwargs = dict(target_modules="all-linear", feedforward_modules=feedforward, task_type=task_type)
    peft_model = get_peft_model(tiny_model(model_type, task), peft_ia3_config(**kwargs))
    ours = IA3Model(tiny_model(model_type, task), IA3Config(**kwargs))
    assert set(ours.ia3_layers()) == ia3_module_names(peft_model)
    assert ours.trainable_parameters() == peft_model.get_nb_trainable_parameters()

    randomize_adapter(ours, "default")
    ours.save_adapter(str(tmp_path / "a"))
    assert json.load(open(tmp_path / "a" / "adapter_config.json"))["target_modules"] == "all-linear"
    back = PeftModel.from_pretrained(tiny_model(model_type, task), str(tmp_path / "a"))
    assert max_diff(outputs(ours, model_type), outputs(back, model_type)) <= TOL

    # PEFT saves "all-linear" expanded into full module names; those load here too
    randomize_peft(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    assert isinstance(json.load(open(tmp_path / "peft" / "adapter_config.json"))["target_modules"], list)
    loaded = IA3Model(tiny_model(model_type, task))
    loaded.load_adapter(str(tmp_path / "peft"))
    assert max_diff(outputs(loaded, model_type), outputs(peft_model, model_type)) <= TOL


def test_targets_without_feedforward_take_the_default_feedforward_like_peft(tmp_path):
    """PEFT fills a missing feedforward_modules from its table even when targets are given."""
    kwargs = dict(target_modules=["k_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(tiny_model("llama"), peft_ia3_config(**kwargs))
    ours = IA3Model(tiny_model("llama"), IA3Config(**kwargs))
    flags = {path: layer.feedforward["default"] for path, layer in ours.ia3_layers().items()}
    assert flags == peft_feedforward(peft_model)
    assert sum(flags.values()) == 2  # down_proj of both layers scales its input
    # and a target list without the feed-forward layer is not refused for the defaulted flag
    IA3Model(tiny_model("llama"), IA3Config(target_modules=["k_proj", "v_proj"]))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "t5"])
def test_bfloat16_model_matches_peft(model_type, tmp_path):
    peft_model = get_peft_model(tiny_model(model_type), peft_ia3_config(model_type))
    randomize_peft(peft_model)
    peft_model.save_pretrained(tmp_path)
    reference = outputs(peft_model, model_type)  # float32 PEFT
    peft_bf16 = PeftModel.from_pretrained(tiny_model(model_type).to(torch.bfloat16), str(tmp_path))

    ours = IA3Model(tiny_model(model_type).to(torch.bfloat16))
    ours.load_adapter(str(tmp_path))
    assert all(p.dtype == torch.float32 for layer in ours.ia3_layers().values() for p in layer.ia3_l.values())
    assert all(layer.base_layer.weight.dtype == torch.bfloat16 for layer in ours.ia3_layers().values())
    got, theirs = outputs(ours, model_type), outputs(peft_bf16, model_type)
    scale = reference.abs().max().item()
    # bf16 keeps ~3 significant digits; measured: 0.5-0.9% of the scale for both sides, vs each other
    # and vs float32 (the same error PEFT makes). 2% leaves room for other seeds.
    assert max_diff(got, theirs) <= 0.02 * scale
    assert max_diff(got, reference) <= 0.02 * scale


def test_peft_config_file_round_trips_our_fields(tmp_path):
    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                       exclude_modules=["layers.1.self_attn.k_proj"], init_ia3_weights=False,
                       base_model_name_or_path="tiny/llama")
    ours = IA3Model(tiny_model("llama"), config)
    ours.save_adapter(str(tmp_path / "a"))
    written = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert written["peft_type"] == "IA3" and written["exclude_modules"] == ["layers.1.self_attn.k_proj"]
    back = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "a"))
    assert ia3_module_names(back) == set(ours.ia3_layers())
    assert "model.layers.1.self_attn.k_proj" not in ours.ia3_layers()
    assert max_diff(outputs(back, "llama"), outputs(ours, "llama")) <= TOL
    # init_ia3_weights=False starts from random vectors, in PEFT and here
    assert max_diff(outputs(ours, "llama"), outputs(tiny_model("llama"), "llama")) > 1e-3
    assert os.path.isfile(tmp_path / "a" / "adapter_model.safetensors")


def test_torch_free_writer_round_trips_through_peft(tmp_path):
    """write_adapter with numpy arrays (as a serving tool without torch would) gives a folder PEFT reads."""
    from ia3_export.formats.adapter_format import read_adapter, write_adapter

    ours = IA3Model(tiny_model("bert", "seq-cls"), IA3Config(task_type="SEQ_CLS"))
    randomize_adapter(ours, "default")
    ours.save_adapter(str(tmp_path / "a"))
    adapter = read_adapter(str(tmp_path / "a"))
    write_adapter(str(tmp_path / "b"), adapter.config, adapter.tensors)
    back = PeftModel.from_pretrained(tiny_model("bert", "seq-cls"), str(tmp_path / "b"))
    assert max_diff(outputs(back, "bert"), outputs(ours, "bert")) <= TOL
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


@pytest.mark.parametrize("model_type,task,task_type", [("llama", None, "CAUSAL_LM"), ("bert", "seq-cls", "SEQ_CLS")])
def test_peft_ia3config_object_is_accepted(model_type, task, task_type):
    """PEFT users pass PEFT's IA3Config object: it means what it means in PEFT (same layers,
    same parameter count), task_type enum included."""
    from peft import IA3Config as PeftIA3Config

    config = PeftIA3Config(task_type=task_type, target_modules=["k_proj", "v_proj", "down_proj"] if task is None
                           else ["key", "value", "output.dense"], feedforward_modules=["down_proj"] if task is None
                           else ["output.dense"])
    ours = IA3Model(tiny_model(model_type, task), config)
    peft_model = get_peft_model(tiny_model(model_type, task), config)
    assert ours.configs["default"].task_type == task_type
    assert ours.trainable_parameters()[0] == peft_model.get_nb_trainable_parameters()[0]
    assert set(ours.ia3_layers()) == ia3_module_names(peft_model)


def test_other_config_objects_are_refused_with_what_is_accepted():
    from peft import LoraConfig

    from ia3_export.errors import IA3Error

    with pytest.raises(IA3Error, match="peft_type is 'LORA', not 'IA3'"):
        IA3Model(tiny_model("llama"), LoraConfig(r=4))
    with pytest.raises(IA3Error, match="expected an ia3_export.IA3Config or PEFT's peft.IA3Config, got dict"):
        IA3Model(tiny_model("llama"), {"target_modules": ["k_proj"]})
