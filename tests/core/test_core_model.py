"""Named adapters on one model: add, activate one or several, disable, delete, train.

The reference is float64 math applied with hooks on a float64 copy of the base model:
input scaling multiplies what enters a layer, output scaling what leaves it, and several
active adapters multiply (in float64) before that.
"""
from __future__ import annotations

import copy

import pytest
import torch
from core_helpers import max_diff, outputs
from torch import nn

from ia3_export.core.config import IA3Config
from ia3_export.errors import IA3Error
from ia3_export.core.layers import IA3Layer
from ia3_export.core.model import IA3Model
from ia3_export.examples.tiny import randomize_adapter, tiny_model

TOL = 1e-5


def reference(base: nn.Module, model: IA3Model, names: list[str]) -> nn.Module:
    """A float64 copy of `base` whose layers scale like the named adapters of `model`, via hooks."""
    ref = copy.deepcopy(base).double()
    for path, layer in model.ia3_layers().items():
        scale_in = scale_out = None
        for name in names:
            if name not in layer.ia3_l:
                continue
            vector = layer.ia3_l[name].detach().double()
            if layer.feedforward[name]:
                scale_in = vector if scale_in is None else scale_in * vector
            else:
                scale_out = vector if scale_out is None else scale_out * vector
        target = ref.get_submodule(path)
        if scale_in is not None:
            target.register_forward_pre_hook(lambda m, args, s=scale_in: (args[0] * s, *args[1:]))
        if scale_out is not None:
            target.register_forward_hook(lambda m, args, out, s=scale_out: out * s)
    return ref


@pytest.fixture
def two_adapters():
    """llama with adapters "a" (keys, values, down_proj) and "b" (values, up/down_proj), random vectors."""
    model = IA3Model(tiny_model("llama"))
    model.add_adapter("a", IA3Config())
    model.add_adapter("b", IA3Config(target_modules=["v_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"]))
    randomize_adapter(model, "a", seed=1)
    randomize_adapter(model, "b", seed=2)
    return model


@pytest.mark.parametrize("active", [["a"], ["b"], ["a", "b"]])
def test_active_adapters_match_float64_math(two_adapters, active):
    base = tiny_model("llama")
    two_adapters.set_adapter(active)
    assert two_adapters.active_adapters == tuple(active)
    expected = outputs(reference(base, two_adapters, active), "llama")
    assert max_diff(outputs(two_adapters, "llama"), expected) <= TOL
    assert max_diff(outputs(two_adapters, "llama"), outputs(base, "llama")) > 1e-2


def test_disable_adapters_runs_the_base_model_and_restores(two_adapters):
    base = tiny_model("llama")
    two_adapters.set_adapter(["a", "b"])
    with_adapters = outputs(two_adapters, "llama")
    with two_adapters.disable_adapters():
        assert max_diff(outputs(two_adapters, "llama"), outputs(base, "llama")) == 0
    assert max_diff(outputs(two_adapters, "llama"), with_adapters) == 0
    with pytest.raises(RuntimeError), two_adapters.disable_adapters():
        raise RuntimeError("inside")
    assert two_adapters.active_adapters == ("a", "b")
    assert max_diff(outputs(two_adapters, "llama"), with_adapters) == 0


def test_delete_adapter(two_adapters):
    two_adapters.set_adapter(["a", "b"])
    two_adapters.delete_adapter("a")
    assert list(two_adapters.configs) == ["b"] and two_adapters.active_adapters == ("b",)
    assert not any("a" in layer.ia3_l for layer in two_adapters.ia3_layers().values())
    # k_proj was only a's target: it is a plain Linear again
    assert isinstance(two_adapters.model.model.layers[0].self_attn.k_proj, nn.Linear)
    expected = outputs(reference(tiny_model("llama"), two_adapters, ["b"]), "llama")
    assert max_diff(outputs(two_adapters, "llama"), expected) <= TOL
    two_adapters.delete_adapter("b")
    assert not two_adapters.ia3_layers()
    assert max_diff(outputs(two_adapters, "llama"), outputs(tiny_model("llama"), "llama")) == 0
    with pytest.raises(IA3Error, match="no adapter named 'b'; loaded adapters: none"):
        two_adapters.delete_adapter("b")


def test_feedforward_flag_belongs_to_each_adapter():
    """Two adapters on the same down_proj: one scales its input, the other its output (PEFT cannot)."""
    model = IA3Model(tiny_model("llama"))
    model.add_adapter("ff", IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]))
    model.add_adapter("out", IA3Config(target_modules=["down_proj"], feedforward_modules=[]))
    randomize_adapter(model, "ff", seed=3)
    randomize_adapter(model, "out", seed=4)
    layer = model.model.model.layers[0].mlp.down_proj
    assert layer.feedforward == {"ff": True, "out": False}
    assert layer.ia3_l["ff"].shape == (64,) and layer.ia3_l["out"].shape == (32,)
    assert layer.vector_shape("ff") == (1, 64) and layer.vector_shape("out") == (32, 1)
    model.set_adapter(["ff", "out"])
    expected = outputs(reference(tiny_model("llama"), model, ["ff", "out"]), "llama")
    assert max_diff(outputs(model, "llama"), expected) <= TOL


def test_only_active_vectors_and_heads_train():
    model = IA3Model(tiny_model("llama", "seq-cls"))
    model.add_adapter("a", IA3Config(task_type="SEQ_CLS"))
    model.add_adapter("b", IA3Config(task_type="SEQ_CLS"))
    model.set_adapter("a")
    model.train()
    out = model(input_ids=torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([1]))
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad <= trainable
    assert all(".ia3_l.a" in n or ".copies.a." in n for n in trainable)
    assert any(".copies.a." in n for n in with_grad) and any(".ia3_l.a" in n for n in with_grad)
    vectors = sum(p.numel() for layer in model.ia3_layers().values() for p in [layer.ia3_l["a"]])
    head = sum(p.numel() for p in model.model.score.copies["a"].parameters())
    assert model.trainable_parameters()[0] == vectors + head


def test_vectors_stay_float32_in_a_half_precision_model():
    model = IA3Model(tiny_model("llama").to(torch.float16), IA3Config())
    for layer in model.ia3_layers().values():
        assert layer.ia3_l["default"].dtype == torch.float32
        assert layer.base_layer.weight.dtype == torch.float16
    assert outputs(model, "llama").isfinite().all()


def test_casting_the_wrapped_model_keeps_vectors_float32():
    model = IA3Model(tiny_model("llama"), IA3Config())
    randomize_adapter(model, "default")
    vectors = {path: layer.ia3_l["default"] for path, layer in model.ia3_layers().items()}
    values = {path: v.detach().clone() for path, v in vectors.items()}
    model.to(torch.bfloat16)
    for path, layer in model.ia3_layers().items():
        assert layer.base_layer.weight.dtype == torch.bfloat16
        assert layer.ia3_l["default"] is vectors[path]  # same Parameter: an optimizer keeps tracking it
        assert layer.ia3_l["default"].dtype == torch.float32
        assert torch.equal(layer.ia3_l["default"], values[path])  # no bf16 round trip (~1e-3 off)
    model.to(torch.float64)
    assert all(layer.ia3_l["default"].dtype == torch.float32 for layer in model.ia3_layers().values())


def test_conv1d_layers_scale_like_linear_ones():
    model = IA3Model(tiny_model("gpt2"), IA3Config())
    randomize_adapter(model, "default")
    assert all(layer.is_conv1d for layer in model.ia3_layers().values())
    expected = outputs(reference(tiny_model("gpt2"), model, ["default"]), "gpt2")
    assert max_diff(outputs(model, "gpt2"), expected) <= TOL


def test_layer_reads_weight_and_bias_of_the_wrapped_layer():
    linear = nn.Linear(4, 3)
    layer = IA3Layer(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias


def test_targeting_a_module_that_is_not_linear_is_an_error():
    with pytest.raises(IA3Error, match="target model.embed_tokens is a Embedding; IA3 wraps nn.Linear and Conv1D only"):
        IA3Model(tiny_model("llama"), IA3Config(target_modules=["embed_tokens"]))
    with pytest.raises(IA3Error, match="matched no module of this llama model; its Linear layers are named: .*down_proj"):
        IA3Model(tiny_model("llama"), IA3Config(target_modules=["w2"]))


def test_adapter_names_are_checked(two_adapters):
    with pytest.raises(IA3Error, match="an adapter named 'a' already exists"):
        two_adapters.add_adapter("a", IA3Config())
    with pytest.raises(IA3Error, match="no adapter named 'c'; loaded adapters: a, b"):
        two_adapters.set_adapter(["a", "c"])
    with pytest.raises(IA3Error, match="several adapters are loaded"):
        two_adapters.save_adapter("/nonexistent/never-written")


def test_two_heads_cannot_be_active_together():
    model = IA3Model(tiny_model("bert", "seq-cls"))
    model.add_adapter("a", IA3Config(task_type="SEQ_CLS"))
    model.add_adapter("b", IA3Config(task_type="SEQ_CLS"))
    model.set_adapter(["a", "b"])
    with pytest.raises(IA3Error, match="adapters a, b each carry their own copy of a saved module"):
        outputs(model, "bert")


def test_explicit_modules_to_save_must_exist():
    with pytest.raises(IA3Error, match="modules_to_save entry 'head' names no module of this llama model"):
        IA3Model(tiny_model("llama"), IA3Config(modules_to_save=["head"]))
    model = IA3Model(tiny_model("llama"), IA3Config(modules_to_save=["lm_head"]))
    assert list(model.saved_modules()) == ["lm_head"]
