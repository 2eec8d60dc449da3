"""IA3Config: PEFT's matching rules, the per-architecture defaults, and the PEFT differences text."""
from __future__ import annotations

import re

import pytest
from core_helpers import ia3_module_names, peft_feedforward
from peft import get_peft_model
from peft import IA3Config as PeftIA3Config
from peft.tuners.ia3 import IA3Model as PeftIA3Model
from peft.tuners.tuners_utils import check_target_module_exists

from ia3_export.core.config import DEFAULT_TARGETS, PEFT_DIFFERENCES, IA3Config, matches
from ia3_export.errors import IA3Error
from ia3_export.core.model import IA3Model
from ia3_export.examples.tiny import TINY_CONFIGS, tiny_model

# What the defaults are meant to scale, written out per architecture ({i}: any layer index):
# keys and values (output scaling, False) and the second feed-forward layer (input scaling, True).
DECODER_KV_DOWN = {"model.layers.{i}.self_attn.k_proj": False, "model.layers.{i}.self_attn.v_proj": False,
                   "model.layers.{i}.mlp.down_proj": True}
INTENDED = {
    "llama": DECODER_KV_DOWN, "mistral": DECODER_KV_DOWN, "qwen2": DECODER_KV_DOWN,
    "qwen3": DECODER_KV_DOWN, "gemma": DECODER_KV_DOWN, "gemma2": DECODER_KV_DOWN,
    "phi3": {"model.layers.{i}.self_attn.qkv_proj": False, "model.layers.{i}.mlp.down_proj": True},
    "gpt2": {"transformer.h.{i}.attn.c_attn": False, "transformer.h.{i}.mlp.c_proj": True},
    "opt": {"model.decoder.layers.{i}.self_attn.k_proj": False, "model.decoder.layers.{i}.self_attn.v_proj": False,
            "model.decoder.layers.{i}.fc2": True},
    "gpt_neox": {"gpt_neox.layers.{i}.attention.query_key_value": False, "gpt_neox.layers.{i}.mlp.dense_4h_to_h": True},
    "bert": {"bert.encoder.layer.{i}.attention.self.key": False, "bert.encoder.layer.{i}.attention.self.value": False,
             "bert.encoder.layer.{i}.output.dense": True},
    "roberta": {"roberta.encoder.layer.{i}.attention.self.key": False,
                "roberta.encoder.layer.{i}.attention.self.value": False, "roberta.encoder.layer.{i}.output.dense": True},
    "t5": {"encoder.block.{i}.layer.0.SelfAttention.k": False, "encoder.block.{i}.layer.0.SelfAttention.v": False,
           "encoder.block.{i}.layer.1.DenseReluDense.wo": True,
           "decoder.block.{i}.layer.0.SelfAttention.k": False, "decoder.block.{i}.layer.0.SelfAttention.v": False,
           "decoder.block.{i}.layer.1.EncDecAttention.k": False, "decoder.block.{i}.layer.1.EncDecAttention.v": False,
           "decoder.block.{i}.layer.2.DenseReluDense.wo": True},
    "bart": {"model.encoder.layers.{i}.self_attn.k_proj": False, "model.encoder.layers.{i}.self_attn.v_proj": False,
             "model.encoder.layers.{i}.fc2": True,
             "model.decoder.layers.{i}.self_attn.k_proj": False, "model.decoder.layers.{i}.self_attn.v_proj": False,
             "model.decoder.layers.{i}.encoder_attn.k_proj": False,
             "model.decoder.layers.{i}.encoder_attn.v_proj": False, "model.decoder.layers.{i}.fc2": True},
}


def test_every_default_and_tiny_model_is_covered():
    assert set(INTENDED) == set(DEFAULT_TARGETS) == set(TINY_CONFIGS)


@pytest.mark.parametrize("model_type", sorted(INTENDED))
def test_default_targets_are_exactly_the_intended_modules(model_type):
    model = IA3Model(tiny_model(model_type), IA3Config())
    expected = {pattern.format(i=i): ff for pattern, ff in INTENDED[model_type].items() for i in (0, 1)}
    got = {path: layer.feedforward["default"] for path, layer in model.ia3_layers().items()}
    assert got == expected
    for layer in model.ia3_layers().values():  # input scaling has the input's size, output the output's
        dim = layer.in_features if layer.feedforward["default"] else layer.out_features
        assert layer.ia3_l["default"].shape == (dim,)


def _peft_default_modules(model_type):
    """(module -> feed-forward flag) under PEFT's own defaults, or None where PEFT has none."""
    try:
        peft_model = get_peft_model(tiny_model(model_type), PeftIA3Config())
    except ValueError:
        return None
    return peft_feedforward(peft_model)


@pytest.mark.parametrize("model_type", sorted(DEFAULT_TARGETS))
def test_peft_differences_text_matches_peft(model_type):
    ours = IA3Model(tiny_model(model_type), IA3Config())
    mine = {path: layer.feedforward["default"] for path, layer in ours.ia3_layers().items()}
    theirs = _peft_default_modules(model_type)
    if theirs == mine:
        assert model_type not in PEFT_DIFFERENCES
        return
    text = PEFT_DIFFERENCES[model_type]
    if theirs is None:
        assert "no default" in text
        return
    for path in set(theirs) - set(mine):  # every module PEFT scales and we do not is named
        assert path.rsplit(".", 1)[-1] in text, (path, text)
    for path in set(mine) - set(theirs):  # and so is every role we scale and PEFT does not
        assert {"k_proj": "not keys", "v_proj": "not values"}[path.rsplit(".", 1)[-1]] in text, (path, text)


NAMES = ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.xk_proj", "k_proj",
         "model.layers.1.mlp.down_proj", "bert.encoder.layer.0.attention.output.dense",
         "bert.encoder.layer.0.output.dense", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]
PATTERNS = [["k_proj"], ["down_proj", "v_proj"], ["output.dense"], ["mlp.c_proj"], ["proj"], ["dense"],
            r".*\.k_proj", r"k_proj", r".*layer\.\d+\.output\.dense", r".*\.(c_attn|c_proj)"]


@pytest.mark.parametrize("patterns", PATTERNS, ids=str)
def test_target_matching_is_peft_matching(patterns):
    config = PeftIA3Config(target_modules=patterns, feedforward_modules=[])
    for name in NAMES:
        assert matches(name, patterns) == bool(check_target_module_exists(config, name)), name


@pytest.mark.parametrize("patterns", PATTERNS, ids=str)
def test_feedforward_matching_is_peft_matching(patterns):
    """PEFT matches a feedforward list by plain suffix, without the dot boundary."""
    config = PeftIA3Config(target_modules=patterns, feedforward_modules=patterns)
    for name in NAMES:
        peft_says = PeftIA3Model._check_target_module_feedforward(config, name)
        assert matches(name, patterns, suffix_needs_dot=False) == peft_says, name


@pytest.mark.parametrize("exclude", [["layers.1.self_attn.k_proj"], r".*\.1\..*", ["v_proj"]], ids=str)
def test_exclude_modules_like_peft(exclude):
    kwargs = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                  exclude_modules=exclude)
    peft_model = get_peft_model(tiny_model("llama"), PeftIA3Config(**kwargs))
    ours = IA3Model(tiny_model("llama"), IA3Config(**kwargs))
    assert set(ours.ia3_layers()) == ia3_module_names(peft_model)
    assert len(ours.ia3_layers()) < 6


def test_regex_string_is_a_full_match():
    ours = IA3Model(tiny_model("llama"), IA3Config(target_modules=r".*\.0\.self_attn\.(k|v)_proj"))
    assert set(ours.ia3_layers()) == {"model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"}
    with pytest.raises(IA3Error, match="matched no module"):
        IA3Model(tiny_model("llama"), IA3Config(target_modules="k_proj"))  # not a search


def test_all_linear_is_case_insensitive_and_skips_the_lm_head():
    ours = IA3Model(tiny_model("llama"), IA3Config(target_modules="ALL-LINEAR", feedforward_modules=["down_proj"]))
    assert "lm_head" not in ours.ia3_layers()
    assert len(ours.ia3_layers()) == 2 * 7  # q k v o gate up down per layer


def test_fan_in_fan_out_follows_the_layer_type(tmp_path):
    """Conv1D always reads [in, out] (PEFT forces the flag on); a Linear ignores it (PEFT forces it off)."""
    import json

    gpt2 = IA3Model(tiny_model("gpt2"), IA3Config(fan_in_fan_out=False))
    gpt2.save_adapter(str(tmp_path / "gpt2"))
    assert json.load(open(tmp_path / "gpt2" / "adapter_config.json"))["fan_in_fan_out"] is True
    a = IA3Model(tiny_model("llama"), IA3Config(fan_in_fan_out=True))
    b = IA3Model(tiny_model("llama"), IA3Config())
    assert set(a.ia3_layers()) == set(b.ia3_layers())


def test_init_ia3_weights():
    ones = IA3Model(tiny_model("llama"), IA3Config())
    assert all((p == 1).all() for layer in ones.ia3_layers().values() for p in layer.ia3_l.values())
    rand = IA3Model(tiny_model("llama"), IA3Config(init_ia3_weights=False))
    assert all(not (p == 1).all() for layer in rand.ia3_layers().values() for p in layer.ia3_l.values())


def test_config_values_are_checked():
    with pytest.raises(IA3Error, match="unknown task_type 'SEQ_CLASS'"):
        IA3Config(task_type="SEQ_CLASS")
    with pytest.raises(IA3Error, match="target_modules must be a list"):
        IA3Config(target_modules=3)
    assert IA3Config(target_modules={"v", "k"}).target_modules == ["k", "v"]
    assert IA3Config(modules_to_save="score").modules_to_save == ["score"]


def test_feedforward_must_be_a_subset_of_targets():
    with pytest.raises(IA3Error, match=re.escape("feedforward_modules ['fc2'] are not in target_modules")):
        IA3Model(tiny_model("llama"), IA3Config(target_modules=["k_proj"], feedforward_modules=["fc2"]))
    with pytest.raises(IA3Error, match="match model.layers.0.mlp.down_proj, which is not a target"):
        IA3Model(tiny_model("llama"), IA3Config(target_modules=["k_proj"], feedforward_modules=r".*down_proj"))


def test_unknown_model_type_needs_explicit_targets():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(IA3Error, match="no default IA3 targets for model type 'mystery'; pass target_modules"):
        IA3Model(model, IA3Config())
    assert len(IA3Model(model, IA3Config(target_modules=["v_proj"])).ia3_layers()) == 2


def test_from_peft_dict():
    config = IA3Config.from_peft_dict({"peft_type": "IA3", "target_modules": ["k"], "peft_version": "0.21.2",
                                       "task_type": "SEQ_2_SEQ_LM"})
    assert config.target_modules == ["k"] and config.task_type == "SEQ_2_SEQ_LM"
    with pytest.raises(IA3Error, match="peft_type is 'LORA', not 'IA3'"):
        IA3Config.from_peft_dict({"peft_type": "LORA"}, source="x/adapter_config.json")
    with pytest.raises(IA3Error, match="expected a JSON object, got list"):
        IA3Config.from_peft_dict([1])
    assert IA3Config.from_peft_dict(IA3Config(target_modules=["k"], feedforward_modules=[]).to_peft_dict()) == \
        IA3Config(target_modules=["k"], feedforward_modules=[])
