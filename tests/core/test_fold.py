"""Folding adapters into the weights: same outputs, exact layouts, refusals that leave weights alone."""
from __future__ import annotations

import pytest
import torch
from core_helpers import max_diff, outputs, peft_ia3_config, randomize_peft
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from ia3_export.core.config import IA3Config
from ia3_export.errors import IA3Error
from ia3_export.core.layers import IA3Layer
from ia3_export.core.model import IA3Model
from ia3_export.examples.tiny import TINY_CONFIGS, randomize_adapter, tiny_model

TOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Float32 rounding after folding: 1e-5 relative to the outputs' scale (T5's reach ~50)."""
    return max_diff(a, b) <= TOL * max(1.0, b.abs().max().item())


def weights(model: IA3Model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.state_dict().items() if "ia3_l" not in k}


@pytest.mark.parametrize("model_type", list(TINY_CONFIGS))
def test_fold_keeps_outputs_and_unfold_restores_weights(model_type):
    model = IA3Model(tiny_model(model_type), IA3Config())
    randomize_adapter(model, "default")
    before, original = outputs(model, model_type), weights(model)
    model.fold()
    assert all(layer.folded == ["default"] for layer in model.ia3_layers().values())
    assert close(outputs(model, model_type), before)
    assert max(max_diff(weights(model)[k], v) for k, v in original.items()) > 1e-3  # weights did change
    model.unfold()
    restored = weights(model)
    for key, value in original.items():
        assert torch.allclose(restored[key], value, rtol=1e-6, atol=1e-7), key
    assert close(outputs(model, model_type), before)


def test_fold_layout_linear_and_conv1d():
    """Output scaling multiplies weight rows and the bias; input scaling the columns; Conv1D is [in, out]."""
    torch.manual_seed(0)
    out_v, in_v = torch.rand(3) + 0.5, torch.rand(4) + 0.5
    for base in (nn.Linear(4, 3), Conv1D(3, 4)):
        w, b = base.weight.detach().clone(), base.bias.detach().clone()
        layer = IA3Layer(base)
        layer.add_adapter("o", feedforward=False)
        layer.add_adapter("i", feedforward=True)
        with torch.no_grad():
            layer.ia3_l["o"].copy_(out_v)
            layer.ia3_l["i"].copy_(in_v)
        layer.rescale_weights("o")
        layer.rescale_weights("i")
        linear_w = w if isinstance(base, nn.Linear) else w.T  # [out, in]
        expected = linear_w * out_v[:, None] * in_v[None, :]
        got = base.weight if isinstance(base, nn.Linear) else base.weight.T
        assert torch.allclose(got, expected, atol=1e-7)
        assert torch.allclose(base.bias, b * out_v, atol=1e-7)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "bert", "t5"])
def test_merge_and_unload_equals_peft(model_type):
    task_type = "SEQ_CLS" if model_type == "bert" else None
    peft_model = get_peft_model(tiny_model(model_type), peft_ia3_config(model_type, task_type=task_type))
    randomize_peft(peft_model)
    state = {k.removeprefix("base_model.model."): v for k, v in peft_model.state_dict().items()}
    ours = IA3Model(tiny_model(model_type), IA3Config(task_type=task_type))
    for path, layer in ours.ia3_layers().items():
        with torch.no_grad():
            layer.ia3_l["default"].copy_(state[f"{path}.ia3_l.default"].reshape(-1))
    for path, saved in ours.saved_modules().items():
        saved.copies["default"].load_state_dict(
            {k.split("modules_to_save.default.")[1]: v for k, v in state.items() if k.startswith(f"{path}.modules_to_save.")})
    theirs = peft_model.merge_and_unload()
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, IA3Layer) for m in merged.modules())
    assert type(merged) is type(theirs)
    assert close(outputs(merged, model_type), outputs(theirs, model_type))
    assert all(not p.requires_grad for p in merged.parameters())


@pytest.mark.parametrize("model_type,task", [("llama", None), ("gpt2", None), ("bert", "seq-cls")])
def test_merged_model_saves_and_loads_back(model_type, task, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model = IA3Model(tiny_model(model_type, task), IA3Config(task_type="SEQ_CLS" if task else None))
    randomize_adapter(model, "default")
    before = outputs(model, model_type)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    cls = AutoModelForSequenceClassification if task else AutoModelForCausalLM
    reloaded = cls.from_pretrained(tmp_path).eval()
    assert close(outputs(reloaded, model_type), before)


def test_several_adapters_fold_as_their_product():
    model = IA3Model(tiny_model("qwen2"))
    model.add_adapter("a", IA3Config())
    model.add_adapter("b", IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[]))
    randomize_adapter(model, "a", seed=1)
    randomize_adapter(model, "b", seed=2)
    model.set_adapter(["a", "b"])
    before = outputs(model, "qwen2")
    model.fold(["a"])  # one folded, one still applied at run time
    assert close(outputs(model, "qwen2"), before)
    merged = model.merge_and_unload()
    assert close(outputs(merged, "qwen2"), before)


def test_unfold_refuses_zeros_and_leaves_weights():
    model = IA3Model(tiny_model("llama"), IA3Config())
    randomize_adapter(model, "default")
    with torch.no_grad():
        model.model.model.layers[1].self_attn.v_proj.ia3_l["default"][3] = 0.0
    model.fold()
    folded = weights(model)
    with pytest.raises(IA3Error, match="adapter 'default' has zeros in model.layers.1.self_attn.v_proj; unfolding would divide by zero"):
        model.unfold()
    assert all(torch.equal(weights(model)[k], v) for k, v in folded.items())
    assert all(layer.folded == ["default"] for layer in model.ia3_layers().values())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fold_refuses_non_finite_vectors_and_leaves_weights(bad):
    model = IA3Model(tiny_model("gpt2"), IA3Config())
    randomize_adapter(model, "default")
    with torch.no_grad():
        model.model.transformer.h[1].mlp.c_proj.ia3_l["default"][0] = bad
    original = weights(model)
    with pytest.raises(IA3Error, match="adapter 'default' has non-finite values in transformer.h.1.mlp.c_proj; it cannot be folded"):
        model.fold()
    with pytest.raises(IA3Error, match="non-finite values in transformer.h.1.mlp.c_proj"):
        model.merge_and_unload()
    assert all(torch.equal(weights(model)[k], v) for k, v in original.items())
    assert not any(layer.folded for layer in model.ia3_layers().values())


def test_merge_with_two_heads_refused_before_folding():
    model = IA3Model(tiny_model("bert", "seq-cls"))
    model.add_adapter("a", IA3Config(task_type="SEQ_CLS"))
    model.add_adapter("b", IA3Config(task_type="SEQ_CLS"))
    randomize_adapter(model, "a")
    original = weights(model)
    with pytest.raises(IA3Error, match="each carry their own copy of a saved module"):
        model.merge_and_unload(["a", "b"])
    assert all(torch.equal(weights(model)[k], v) for k, v in original.items())


def test_folded_adapter_cannot_be_deleted():
    model = IA3Model(tiny_model("llama"), IA3Config())
    model.fold()
    with pytest.raises(IA3Error, match="adapter 'default' is folded into the weights; unfold it before deleting it"):
        model.delete_adapter("default")


def test_bfloat16_fold_stays_close():
    model = IA3Model(tiny_model("llama").to(torch.bfloat16), IA3Config())
    randomize_adapter(model, "default")
    before = outputs(model, "llama")
    model.fold()
    assert all(layer.base_layer.weight.dtype == torch.bfloat16 for layer in model.ia3_layers().values())
    assert max_diff(outputs(model, "llama"), before) <= 0.05 * before.abs().max().item()
