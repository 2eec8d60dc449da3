"""Every bad adapter, model folder or file is one clear IA3Error naming what is wrong, and leaves
nothing behind: no half-added adapter, no half-written folder."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from core_helpers import max_diff, outputs
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from ia3_export.formats.adapter_format import read_adapter
from ia3_export.formats.atomic import MARKER
from ia3_export.core.config import IA3Config
from ia3_export.errors import IA3Error
from ia3_export.core.loading import load_base_model
from ia3_export.core.model import IA3Model
from ia3_export.formats.safetensors_io import read_safetensors
from ia3_export.examples.tiny import randomize_adapter, tiny_model

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture
def llama_adapter(tmp_path):
    """A fresh copy of a llama adapter with random vectors, free to corrupt."""
    model = IA3Model(tiny_model("llama"), IA3Config())
    randomize_adapter(model, "default")
    return model.save_adapter(str(tmp_path / "adapter"))


def edit_tensors(path, change):
    tensors = load_file(os.path.join(path, WEIGHTS))
    change(tensors)
    os.remove(os.path.join(path, WEIGHTS))
    save_file(tensors, os.path.join(path, WEIGHTS))


def assert_untouched(model: IA3Model, model_type: str = "llama"):
    """The failed load left the model as it was: no adapter, no wrapper, base outputs."""
    assert model.configs == {} and model.ia3_layers() == {} and model.saved_modules() == {}
    assert max_diff(outputs(model, model_type), outputs(tiny_model(model_type), model_type)) == 0


KEY = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"


def test_wrong_shape_names_the_key(llama_adapter):
    edit_tensors(llama_adapter, lambda t: t.__setitem__(KEY, torch.ones(12, 1)))
    model = IA3Model(tiny_model("llama"))
    with pytest.raises(IA3Error, match=f"adapter: {KEY} has shape \\(12, 1\\), this model needs \\(16, 1\\)"):
        model.load_adapter(llama_adapter)
    assert_untouched(model)


def test_adapter_for_a_wider_model_names_the_key(llama_adapter, tmp_path):
    wide = IA3Model(tiny_model("llama", intermediate_size=96), IA3Config())
    wide.save_adapter(str(tmp_path / "wide"))
    model = IA3Model(tiny_model("llama"))
    with pytest.raises(IA3Error, match=r"wide: base_model\.model\.model\.layers\.0\.mlp\.down_proj\.ia3_l has shape \(1, 96\), this model needs \(1, 64\)"):
        model.load_adapter(str(tmp_path / "wide"))
    assert_untouched(model)


def test_key_for_a_missing_module_names_the_key(llama_adapter):
    extra = "base_model.model.model.layers.7.self_attn.k_proj.ia3_l"
    edit_tensors(llama_adapter, lambda t: t.__setitem__(extra, torch.ones(16, 1)))
    model = IA3Model(tiny_model("llama"))
    with pytest.raises(IA3Error, match=f"key {extra} names no IA3 target or saved module of this llama model"):
        model.load_adapter(llama_adapter)
    assert_untouched(model)


def test_missing_key_is_an_error(llama_adapter):
    edit_tensors(llama_adapter, lambda t: t.pop(KEY))
    model = IA3Model(tiny_model("llama"))
    with pytest.raises(IA3Error, match=f"missing key {KEY}; the adapter is incomplete"):
        model.load_adapter(llama_adapter)
    assert_untouched(model)


def test_adapter_for_another_architecture(tmp_path):
    gpt2 = IA3Model(tiny_model("gpt2"), IA3Config())
    path = gpt2.save_adapter(str(tmp_path / "gpt2-adapter"))
    model = IA3Model(tiny_model("llama"))
    with pytest.raises(IA3Error, match=r"gpt2-adapter: target_modules \[c_attn, mlp.c_proj\] matched no module of this llama model"):
        model.load_adapter(path)
    assert_untouched(model)


def test_failed_load_keeps_other_adapters(llama_adapter, tmp_path):
    model = IA3Model(tiny_model("llama"))
    model.load_adapter(llama_adapter, name="good")
    before = outputs(model, "llama")
    bad = shutil.copytree(llama_adapter, tmp_path / "bad")
    edit_tensors(bad, lambda t: t.pop(KEY))
    with pytest.raises(IA3Error, match="missing key"):
        model.load_adapter(str(bad))
    assert list(model.configs) == ["good"] and model.active_adapters == ("good",)
    assert all(list(layer.ia3_l) == ["good"] for layer in model.ia3_layers().values())
    assert max_diff(outputs(model, "llama"), before) == 0


def test_pickled_adapter_is_refused(llama_adapter):
    os.rename(os.path.join(llama_adapter, WEIGHTS), os.path.join(llama_adapter, "adapter_model.bin"))
    with pytest.raises(IA3Error, match="adapter_model.bin is a pickle, which can run code when loaded; refusing it"):
        read_adapter(llama_adapter)


def test_pickled_model_is_refused(tmp_path):
    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(IA3Error, match=r"has no .safetensors weights \(pytorch_model.bin is a pickle"):
        load_base_model(str(tmp_path))


@pytest.mark.parametrize("corrupt,message", [
    (lambda p: os.remove(os.path.join(p, CONFIG)), "has no adapter_config.json; is it a PEFT adapter folder"),
    (lambda p: os.remove(os.path.join(p, WEIGHTS)), "has no adapter_model.safetensors"),
    (lambda p: open(os.path.join(p, CONFIG), "w").write("{not json"), "adapter_config.json: not valid JSON"),
    (lambda p: json.dump({"peft_type": "LORA"}, open(os.path.join(p, CONFIG), "w")), "peft_type is 'LORA', not 'IA3'"),
    (lambda p: json.dump({"peft_type": "IA3", "task_type": "X"}, open(os.path.join(p, CONFIG), "w")), "unknown task_type 'X'"),
    (lambda p: edit_tensors(p, lambda t: t.__setitem__("model.x.ia3_l", torch.ones(2, 1))),
     "key 'model.x.ia3_l' does not start with 'base_model.model.'"),
    (lambda p: edit_tensors(p, lambda t: t.__setitem__(KEY, torch.ones(4, 4))), f"{KEY} has shape \\(4, 4\\); IA3 vectors are"),
    (lambda p: edit_tensors(p, lambda t: t.__setitem__(KEY, torch.ones(16, 1, dtype=torch.int32))), f"{KEY} has dtype int32"),
    (lambda p: edit_tensors(p, lambda t: t.clear()), "holds no tensors"),
], ids=["no-config", "no-weights", "bad-json", "lora", "task-type", "prefix", "vector-shape", "int-vector", "empty"])
def test_bad_adapter_folders(llama_adapter, corrupt, message):
    corrupt(llama_adapter)
    with pytest.raises(IA3Error, match=message):
        read_adapter(llama_adapter)


def test_missing_adapter_folder():
    with pytest.raises(IA3Error, match="adapter folder /nope does not exist"):
        read_adapter("/nope")


def test_half_precision_adapter_files_load(llama_adapter):
    """A bf16 or fp16 adapter (e.g. saved from a bf16 PEFT model) loads as float32 vectors."""
    for dtype in (torch.bfloat16, torch.float16):
        edit_tensors(llama_adapter, lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
        model = IA3Model(tiny_model("llama"))
        model.load_adapter(llama_adapter)
        expected = load_file(os.path.join(llama_adapter, WEIGHTS))[KEY].float().reshape(-1)
        assert torch.equal(model.model.model.layers[0].self_attn.k_proj.ia3_l[model.active_adapters[0]].detach(), expected)


# -- corrupted safetensors ------------------------------------------------------------------
@pytest.fixture
def good_file(tmp_path):
    path = str(tmp_path / "t.safetensors")
    save_numpy({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=np.float16)}, path)
    return path


def rewrite_header(path, change):
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    new = json.dumps(header).encode()
    open(path, "wb").write(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def test_reader_matches_safetensors(good_file):
    from safetensors.numpy import load_file as load_numpy

    ours, theirs = read_safetensors(good_file), load_numpy(good_file)
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)


def test_reader_widens_bfloat16(tmp_path):
    path = str(tmp_path / "bf16.safetensors")
    value = torch.tensor([1.5, -2.25, 3e-3, 65504.0])
    save_file({"v": value.to(torch.bfloat16)}, path)
    assert np.array_equal(read_safetensors(path)["v"], value.to(torch.bfloat16).float().numpy())


@pytest.mark.parametrize("corrupt,message", [
    (lambda p: open(p, "r+b").truncate(os.path.getsize(p) - 5), "tensor 'b' needs 8 bytes at 24..32 but the file holds 27"),
    (lambda p: open(p, "r+b").truncate(4), "not a safetensors file"),
    (lambda p: open(p, "r+b").truncate(20), "corrupted safetensors header \\(declares \\d+ bytes, file has 20\\)"),
    (lambda p: open(p, "r+b").write((10**12).to_bytes(8, "little")), "corrupted safetensors header \\(declares 1000000000000 bytes"),
    (lambda p: open(p, "r+b").write(b"\x00" * 8 + b"{"), "corrupted safetensors header"),
    (lambda p: rewrite_header(p, lambda h: h.update(a={**h["a"], "data_offsets": [0, 4000]})), "tensor 'a' needs 24 bytes at 0..4000"),
    (lambda p: rewrite_header(p, lambda h: h.update(a={**h["a"], "shape": [2, 30]})), "tensor 'a' needs 240 bytes"),
    (lambda p: rewrite_header(p, lambda h: h.update(a={**h["a"], "data_offsets": [0.5, 24]})), "corrupted safetensors entry for 'a'"),
    (lambda p: rewrite_header(p, lambda h: h.update(a={**h["a"], "shape": [-2, 3]})), "corrupted safetensors entry for 'a'"),
    (lambda p: rewrite_header(p, lambda h: h.update(a="x")), "corrupted safetensors entry for 'a'"),
    (lambda p: rewrite_header(p, lambda h: h.update(a={**h["a"], "dtype": "F8_E4M3", "shape": [4, 6]})), "tensor 'a' has dtype 'F8_E4M3', which this reader does not support"),
], ids=["truncated", "shorter-than-8", "header-beyond-file", "huge-header", "bad-json", "offsets-beyond",
        "shape-vs-bytes", "float-offset", "negative-shape", "not-an-entry", "unsupported-dtype"])
def test_corrupted_safetensors(good_file, corrupt, message):
    corrupt(good_file)
    with pytest.raises(IA3Error, match=message) as error:
        read_safetensors(good_file)
    assert str(error.value).startswith(good_file) and "\n" not in str(error.value)


def test_corrupted_adapter_weights_do_not_half_load(llama_adapter):
    weights = os.path.join(llama_adapter, WEIGHTS)
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 10)
    model = IA3Model(tiny_model("llama"))
    with pytest.raises(IA3Error, match="truncated or corrupted file"):
        model.load_adapter(llama_adapter)
    assert_untouched(model)


# -- atomic outputs -------------------------------------------------------------------------
def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    model = IA3Model(tiny_model("llama"), IA3Config())

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(IA3Error, match="cannot write .*out: No space left on device"):
        model.save_adapter(str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_existing_output_is_not_replaced_without_force(tmp_path):
    model = IA3Model(tiny_model("llama"), IA3Config())
    randomize_adapter(model, "default")
    out = tmp_path / "out"
    model.save_adapter(str(out))
    with pytest.raises(IA3Error, match="already exists; choose another path or pass --force"):
        model.save_adapter(str(out))
    (out / WEIGHTS).write_bytes(b"an older output")
    model.save_adapter(str(out), force=True)
    assert sorted(os.listdir(out)) == [MARKER, CONFIG, WEIGHTS] and (out / WEIGHTS).read_bytes() != b"an older output"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or old folder left beside it
